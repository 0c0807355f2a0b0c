//! Sessions brought in line with what the store held at start-up, what
//! agents report, and servers that leave.

use std::{collections::HashSet, sync::Arc, time::SystemTime};

use tokio::time::Instant;

use super::{FleetEvent, SessionId, SessionRecord, Substate, validate::validate_create};
use crate::fleet::{
    error::FleetError,
    model::{Placement, ReportedSession, ServerId, ServerRecord, SessionState},
    persist,
    state::{Ctx, State},
};

impl State {
    /// Loads stored sessions, rebuilding what depends on them: each
    /// server's occupancy (placements in flight, and live sessions as if
    /// its agent had just reported them, until it does), the queue in its
    /// stored order, and the deadlines.
    pub(in crate::fleet) fn restore_sessions(
        &mut self,
        stored: Vec<persist::StoredSession>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(), FleetError> {
        let mut queued = Vec::new();
        for s in stored {
            let id: SessionId = Arc::from(s.id.as_str());
            let order = match s.request {
                Some(spec) => Some(Arc::new(validate_create(&spec).map_err(|f| {
                    FleetError::Internal(format!(
                        "stored session {id} has a request this broker refuses: {}",
                        f.reason
                    ))
                })?)),
                None => None,
            };
            let server = s
                .server
                .as_deref()
                .and_then(|sid| self.known_server(sid, s.state));
            if let (Some(server_id), true) = (&server, s.state != SessionState::Deleted)
                && let Some(target) = self.servers.get_mut(server_id)
            {
                self.by_load.update(target, |target| {
                    if s.state == SessionState::Creating && s.substate == Some(Substate::Placing) {
                        target.placing.push(Placement {
                            session: id.clone(),
                            kind: s.kind,
                            owner: s.owner.clone(),
                        });
                    } else {
                        // Whether its agent had reported it yet is not
                        // stored: it counts as reported, and the agent's
                        // next heartbeat says whether it still runs.
                        target.sessions.push(ReportedSession {
                            id: s.id.clone(),
                            owner: s.owner.clone(),
                            kind: s.kind,
                            state: s.state,
                            details: Default::default(),
                        });
                    }
                });
            }
            if server.is_none()
                && s.state == SessionState::Creating
                && s.substate == Some(Substate::Placing)
            {
                queued.push((s.queue_position.unwrap_or(0), id.clone()));
            }
            let deadline = s.deadline.map(|at| persist::monotonic_time(at, now, wall));
            if let Some(at) = deadline {
                self.sessions.deadlines.insert((at, id.clone()));
            }
            self.sessions.order.insert(id.clone());
            self.sessions.records.insert(
                id.clone(),
                SessionRecord {
                    id,
                    name: s.name,
                    owner: s.owner,
                    kind: s.kind,
                    server,
                    state: s.state,
                    substate: s.substate,
                    state_reason: s.state_reason,
                    created_at: s.created_at,
                    order,
                    permissions_file: s.permissions_file,
                    tried: s.tried.iter().map(|t| Arc::from(t.as_str())).collect(),
                    deadline,
                    forgotten: s.forgotten,
                    queue_position: s.queue_position,
                    deletions: s.deletions,
                    connections: 0,
                    last_disconnection: None,
                },
            );
        }
        queued.sort();
        self.sessions.next_queue_position = queued.last().map_or(0, |(p, _)| p + 1);
        for (position, id) in queued {
            // Admitted when it was queued: restored whatever the bound.
            if let Some(order) = self.queued_order(&id) {
                self.sessions.queue.push(id, order, position);
            }
        }
        Ok(())
    }

    /// The server a stored session names, as the record's reference: the
    /// known server's shared id, or for a DELETED session whose server
    /// has gone since, the id alone (the leader's record keeps it, and
    /// shows the server again should it re-register); `None` for a live
    /// session on an unknown server.
    pub(in crate::fleet) fn known_server(&self, id: &str, state: SessionState) -> Option<ServerId> {
        match self.servers.get(id) {
            Some(server) => Some(server.id.clone()),
            None if state == SessionState::Deleted => Some(Arc::from(id)),
            None => None,
        }
    }

    /// Brings session records in line with a server's new report, then
    /// lets queued sessions onto the server. `old` is the previous report.
    pub(in crate::fleet) fn reconcile_report(
        &mut self,
        server: &ServerId,
        old: &[ReportedSession],
        now: Instant,
        ctx: &Ctx<'_>,
    ) {
        let Some(target) = self.servers.get_mut(server) else {
            return;
        };
        let reported: Vec<ReportedSession> = target.sessions.clone();
        let placing_before: HashSet<SessionId> =
            target.placing.iter().map(|p| p.session.clone()).collect();
        // Placements the agent now reports stop being reservations: a
        // live one occupies the server as reported, and one it reports
        // DELETED is over (its record says so below), so it must not
        // hold the slot until the server goes.
        self.by_load.update(target, |target| {
            target
                .placing
                .retain(|p| !reported.iter().any(|s| s.id == *p.session));
        });
        let live_now: HashSet<&str> = reported
            .iter()
            .filter(|s| s.state != SessionState::Deleted)
            .map(|s| s.id.as_str())
            .collect();
        let was_live: HashSet<&str> = old
            .iter()
            .filter(|s| s.state != SessionState::Deleted)
            .map(|s| s.id.as_str())
            .collect();
        let placing_ids: HashSet<SessionId> =
            target.placing.iter().map(|p| p.session.clone()).collect();

        let mut moved = Vec::new();
        for s in &reported {
            let id: SessionId = Arc::from(s.id.as_str());
            let (state, substate) = match s.state {
                SessionState::Creating => {
                    (SessionState::Creating, Some(Substate::PendingPreparation))
                }
                other => (other, None),
            };
            match self.sessions.record_mut(&id) {
                // An agent's word that a session is gone from its server
                // says nothing of one the broker holds elsewhere: queued,
                // or placed on another server after this one failed it.
                Some(record)
                    if state == SessionState::Deleted && record.server.as_ref() != Some(server) => {
                }
                Some(record) => {
                    let revive = record.state == SessionState::Deleted
                        && record.forgotten
                        && state != SessionState::Deleted;
                    let deleting =
                        record.state == SessionState::Deleting && state != SessionState::Deleted;
                    let kept = (record.state == SessionState::Deleted && !revive) || deleting;
                    // The agent's word on connections stands for every
                    // session of this server's, whatever the broker makes
                    // of it (deleted, being deleted): a replica shown the
                    // report takes it by the same rule.
                    if !kept || record.server.as_ref() == Some(server) {
                        record.connections = s.details.connections;
                        record.last_disconnection = s.details.last_disconnection;
                    }
                    if record.state == SessionState::Deleted && !revive {
                        continue;
                    }
                    if deleting {
                        continue;
                    }
                    if let Some(other) = record.server.as_ref().filter(|o| *o != server)
                        && let Some(elsewhere) = self.servers.get_mut(other)
                        && elsewhere.placing.iter().any(|p| p.session == id)
                    {
                        // Placed on another server, reported by this one:
                        // it occupies this one now, and its reservation
                        // there must not hold a slot for good.
                        self.by_load.update(elsewhere, |elsewhere| {
                            elsewhere.placing.retain(|p| p.session != id)
                        });
                        moved.push((id.clone(), other.clone()));
                    }
                    record.server = Some(server.clone());
                    record.state = state;
                    record.substate = substate;
                    if record.order.is_none() {
                        // Adopted: the agent's word is the only one there is.
                        if !s.details.name.is_empty() {
                            record.name.clone_from(&s.details.name);
                        }
                        if let Some(at) = s.details.created_at {
                            record.created_at = at;
                        }
                    }
                    if revive {
                        record.forgotten = false;
                        record.state_reason = "Reported again by its agent.".into();
                    }
                    if state == SessionState::Deleted {
                        record.state_reason = "Deleted on its server.".into();
                        self.set_deadline(&id, Some(now + ctx.config.deleted_retention));
                    } else {
                        self.set_deadline(&id, None);
                    }
                }
                None if state != SessionState::Deleted => {
                    self.sessions.insert_record(
                        id.clone(),
                        SessionRecord {
                            id: id.clone(),
                            name: if s.details.name.is_empty() {
                                s.id.clone()
                            } else {
                                s.details.name.clone()
                            },
                            owner: s.owner.clone(),
                            kind: s.kind,
                            server: Some(server.clone()),
                            state,
                            substate,
                            state_reason: "Reported by its agent; not created by the broker."
                                .into(),
                            created_at: s.details.created_at.unwrap_or_else(persist::wall_clock),
                            order: None,
                            permissions_file: String::new(),
                            tried: Vec::new(),
                            deadline: None,
                            forgotten: false,
                            queue_position: None,
                            deletions: 0,
                            connections: s.details.connections,
                            last_disconnection: s.details.last_disconnection,
                        },
                    );
                }
                None => {}
            }
        }
        for (session, server) in moved {
            self.emit(FleetEvent::SessionLeft { session, server }, ctx.events);
        }
        // Sessions the agent reported before and no longer does are gone.
        for gone in was_live.difference(&live_now) {
            let id: SessionId = Arc::from(*gone);
            if placing_ids.contains(&id) {
                continue;
            }
            if let Some(record) = self.sessions.record_mut(&id)
                && record.server.as_ref() == Some(server)
                && record.state != SessionState::Deleted
            {
                let reason = if record.state == SessionState::Deleting {
                    "Deleted on its server."
                } else {
                    "No longer reported by its agent."
                };
                record.state = SessionState::Deleted;
                record.substate = None;
                record.state_reason = reason.into();
                self.set_deadline(&id, Some(now + ctx.config.deleted_retention));
            }
        }
        // Occupancy changes, for the event trail.
        let before: HashSet<&str> = was_live
            .iter()
            .copied()
            .chain(placing_before.iter().map(|p| &**p))
            .collect();
        let after: HashSet<&str> = live_now
            .iter()
            .copied()
            .chain(placing_ids.iter().map(|p| &**p))
            .collect();
        let appeared: Vec<SessionId> = after.difference(&before).map(|s| Arc::from(*s)).collect();
        let left: Vec<SessionId> = before.difference(&after).map(|s| Arc::from(*s)).collect();
        for session in appeared {
            self.emit(
                FleetEvent::SessionAppeared {
                    session,
                    server: server.clone(),
                },
                ctx.events,
            );
        }
        for session in left {
            self.emit(
                FleetEvent::SessionLeft {
                    session,
                    server: server.clone(),
                },
                ctx.events,
            );
        }
        self.drain_queue_onto(server, now, ctx);
    }

    /// A server is gone for good: its reservations are placed elsewhere,
    /// its sessions end.
    pub(in crate::fleet) fn server_removed(
        &mut self,
        server: &ServerRecord,
        now: Instant,
        ctx: &Ctx<'_>,
    ) {
        for p in &server.placing {
            self.emit(
                FleetEvent::SessionLeft {
                    session: p.session.clone(),
                    server: server.id.clone(),
                },
                ctx.events,
            );
        }
        for s in server
            .sessions
            .iter()
            .filter(|s| s.state != SessionState::Deleted)
        {
            self.emit(
                FleetEvent::SessionLeft {
                    session: Arc::from(s.id.as_str()),
                    server: server.id.clone(),
                },
                ctx.events,
            );
        }
        self.sessions.agents.remove(&server.id);
        let ids: Vec<SessionId> = self
            .sessions
            .records
            .values()
            .filter(|r| r.server.as_ref() == Some(&server.id) && r.state != SessionState::Deleted)
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            if let Some(record) = self.sessions.record_mut(&id) {
                // Its server is gone, and with it any client of it.
                record.connections = 0;
                record.last_disconnection = None;
            }
            let placing = server.placing.iter().any(|p| p.session == id);
            if placing {
                // Already released with the server; retry elsewhere.
                if let Some(record) = self.sessions.record_mut(&id) {
                    record.server = None;
                }
                self.attempt_failed(&id, format!("server {} was removed", server.id), now, ctx);
            } else {
                if let Some(record) = self.sessions.record_mut(&id) {
                    record.server = None;
                }
                self.mark_deleted(
                    &id,
                    format!("Its server {} was removed.", server.id),
                    now,
                    ctx,
                );
            }
        }
    }
}
