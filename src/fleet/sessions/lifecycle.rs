//! A session's moves between states: events, deadlines, instructions to
//! agents, the queue, retries and deletion.

use std::sync::Arc;

use tokio::time::Instant;

use super::{
    FleetEvent, Instruction, Order, SequencedEvent, SessionId, Substate,
    validate::{has_room, room_for_any},
};
use crate::fleet::{
    model::{FastMap, ServerId, SessionState},
    state::{Ctx, State},
};

impl State {
    pub(in crate::fleet) fn emit(
        &mut self,
        event: FleetEvent,
        events: Option<&tokio::sync::broadcast::Sender<SequencedEvent>>,
    ) {
        self.emit_with(events, || event);
    }

    /// As [`State::emit`], building the event only if someone listens:
    /// for the events of every item of a batch.
    pub(in crate::fleet) fn emit_with(
        &mut self,
        events: Option<&tokio::sync::broadcast::Sender<SequencedEvent>>,
        event: impl FnOnce() -> FleetEvent,
    ) {
        self.sessions.seq += 1;
        if events.is_none() && !self.watch.recording {
            return;
        }
        let event = event();
        // A session placed or gone changes its server's counts.
        self.watch.touch(event.server());
        if let Some(events) = events {
            // A receiver may have gone since; that is fine.
            let _ = events.send(SequencedEvent {
                seq: self.sessions.seq,
                event,
            });
        }
    }

    pub(in crate::fleet) fn set_deadline(&mut self, id: &SessionId, deadline: Option<Instant>) {
        let Some(record) = self.sessions.records.get_mut(id) else {
            return;
        };
        self.sessions.dirty.insert(id.clone());
        if let Some(old) = record.deadline.take() {
            self.sessions.deadlines.remove(&(old, id.clone()));
        }
        if let Some(at) = deadline {
            record.deadline = Some(at);
            self.sessions.deadlines.insert((at, id.clone()));
        }
    }

    pub(in crate::fleet) fn send(&mut self, instruction: Instruction) {
        let server = instruction.server().clone();
        if let Some(agent) = self.sessions.agents.get(&server)
            && agent.send(instruction).is_err()
        {
            // The agent's stream is gone; what it misses is resent when it
            // reconnects, or times out and is placed elsewhere.
            self.sessions.agents.remove(&server);
        }
    }

    /// Removes `session`'s reservation on its server, if it has one.
    fn release(&mut self, session: &SessionId, ctx: &Ctx<'_>) {
        let Some(server) = self
            .sessions
            .records
            .get(session)
            .and_then(|r| r.server.clone())
        else {
            return;
        };
        let Some(target) = self.servers.get_mut(&server) else {
            return;
        };
        let before = target.placing.len();
        self.by_load.update(target, |target| {
            target.placing.retain(|p| p.session != *session)
        });
        if target.placing.len() != before {
            self.emit(
                FleetEvent::SessionLeft {
                    session: session.clone(),
                    server,
                },
                ctx.events,
            );
        }
    }

    /// Drops `session` from `server`'s last report (its agent confirmed the
    /// deletion).
    pub(in crate::fleet) fn forget_reported(
        &mut self,
        server: &ServerId,
        session: &SessionId,
        ctx: &Ctx<'_>,
    ) {
        let Some(target) = self.servers.get_mut(server) else {
            return;
        };
        let live_before = target
            .sessions
            .iter()
            .any(|s| *s.id == **session && s.state != SessionState::Deleted);
        let reported_before = target.sessions.len();
        self.by_load.update(target, |target| {
            target.sessions.retain(|s| *s.id != **session)
        });
        if target.sessions.len() != reported_before {
            self.liveness_changed(server);
        }
        if live_before {
            self.emit(
                FleetEvent::SessionLeft {
                    session: session.clone(),
                    server: server.clone(),
                },
                ctx.events,
            );
        }
    }

    pub(in crate::fleet) fn mark_deleted(
        &mut self,
        session: &SessionId,
        reason: String,
        now: Instant,
        ctx: &Ctx<'_>,
    ) {
        self.release(session, ctx);
        self.sessions.queue.remove(session);
        if let Some(record) = self.sessions.record_mut(session) {
            record.state = SessionState::Deleted;
            record.substate = None;
            record.state_reason = reason;
        }
        self.set_deadline(session, Some(now + ctx.config.deleted_retention));
    }

    /// The order of `session`, if it has one (adopted sessions do not).
    pub(in crate::fleet) fn queued_order(&self, session: &SessionId) -> Option<Arc<Order>> {
        self.sessions
            .records
            .get(session)
            .and_then(|r| r.order.clone())
    }

    /// Queues `session`. The caller has checked that the queue admits it
    /// ([`super::queue::Queue::admits`]).
    pub(in crate::fleet) fn enqueue(&mut self, session: &SessionId, now: Instant, ctx: &Ctx<'_>) {
        let position = self.sessions.next_queue_position;
        self.sessions.next_queue_position += 1;
        if let Some(record) = self.sessions.record_mut(session) {
            record.queue_position = Some(position);
            record.server = None;
            // Queued: on no server, so no client is connected to it.
            record.connections = 0;
            record.last_disconnection = None;
            record.state = SessionState::Creating;
            record.substate = Some(Substate::Placing);
        }
        if let Some(order) = self.queued_order(session) {
            self.sessions.queue.push(session.clone(), order, position);
        }
        self.set_deadline(session, Some(now + ctx.config.queue_timeout));
    }

    /// The chosen agent failed or did not answer: take the session back
    /// and retry, queue or fail it.
    pub(in crate::fleet) fn attempt_failed(
        &mut self,
        session: &SessionId,
        why: String,
        now: Instant,
        ctx: &Ctx<'_>,
    ) {
        self.sessions.placements.agent_failed += 1;
        self.release(session, ctx);
        let Some(record) = self.sessions.records.get(session) else {
            return;
        };
        if record.state == SessionState::Deleting {
            // Its caller asked for it to go while it was being created:
            // a failed attempt ends it rather than starting another.
            self.mark_deleted(
                session,
                format!("Deleted; its creation failed: {why}"),
                now,
                ctx,
            );
            return;
        }
        let Some(order) = record.order.clone() else {
            return;
        };
        let tried = record.tried.clone();
        let retries_left =
            !order.disable_retry && tried.len() <= ctx.config.create_retries as usize;
        if retries_left && let Some(next) = self.choose_server(&order, &tried, now, ctx) {
            self.place(session, &next, now, ctx);
            return;
        }
        if order.enqueue && retries_left && self.sessions.queue.admits(order.requirements.as_ref())
        {
            self.enqueue(session, now, ctx);
            if let Some(record) = self.sessions.record_mut(session) {
                record.state_reason = why;
            }
            return;
        }
        self.mark_deleted(session, format!("Creation failed: {why}"), now, ctx);
    }

    /// Places queued sessions that `server` can take now, oldest first.
    /// Each distinct Requirements expression is evaluated at most once
    /// (a server's match does not depend on its sessions), so the work is
    /// bounded by the queue's admission bound
    /// ([`super::queue::MAX_QUEUE_REQUIREMENTS_COST`]).
    pub(in crate::fleet) fn drain_queue_onto(
        &mut self,
        server: &ServerId,
        now: Instant,
        ctx: &Ctx<'_>,
    ) {
        if self.sessions.queue.is_empty() {
            return;
        }
        let Some(target) = self.servers.get(server) else {
            return;
        };
        let unreachable_after = ctx.config.unreachable_after;
        if !room_for_any(target, now, unreachable_after) {
            return;
        }
        // Each Requirements group's verdict on this server, once
        // evaluated: it holds for the whole drain, since Requirements do
        // not look at sessions.
        let mut verdicts: FastMap<u64, bool> = FastMap::default();
        let mut i = 0;
        while let Some(entry) = self.sessions.queue.get(i) {
            let Some(target) = self.servers.get(server) else {
                return;
            };
            let matches = match (entry.group, &entry.order.requirements) {
                (Some(group), Some(r)) => {
                    *verdicts.entry(group).or_insert_with(|| r.matches(target))
                }
                _ => true,
            };
            if !matches {
                i += 1;
                continue;
            }
            let (id, order) = (entry.id.clone(), entry.order.clone());
            if has_room(target, &order, now, unreachable_after) {
                self.sessions.queue.remove_at(i);
                self.place(&id, server, now, ctx);
                let full = self
                    .servers
                    .get(server)
                    .is_none_or(|t| !room_for_any(t, now, unreachable_after));
                if full {
                    return;
                }
            } else {
                i += 1;
            }
        }
    }

    /// Processes every session deadline at or before `now`.
    pub(in crate::fleet) fn process_session_deadlines(&mut self, now: Instant, ctx: &Ctx<'_>) {
        while let Some((at, id)) = self.sessions.deadlines.first().cloned() {
            if at > now {
                break;
            }
            // A retry evaluates Requirements under the lock; once this
            // section's budget cannot pay for one, the rest wait for the
            // next operation (the deadline stays due, so it comes soon),
            // rather than fail for want of budget.
            let retry_cost = self
                .sessions
                .records
                .get(&id)
                .filter(|r| r.server.is_some() && r.substate == Some(Substate::Placing))
                .and_then(|r| r.order.as_ref())
                .and_then(|o| o.requirements.as_ref())
                .map_or(0, |r| r.cost());
            if retry_cost > ctx.evaluation_budget.get() {
                break;
            }
            self.sessions.deadlines.remove(&(at, id.clone()));
            let Some(record) = self.sessions.record_mut(&id) else {
                continue;
            };
            record.deadline = None;
            match (record.state, record.substate, record.server.is_some()) {
                (SessionState::Deleted, _, _) => {
                    self.sessions.remove_record(&id);
                }
                (SessionState::Creating, Some(Substate::Placing), false) => {
                    let waited = ctx.config.queue_timeout.as_secs();
                    self.mark_deleted(
                        &id,
                        format!(
                            "No DCV server could take the session within {waited} s in the queue."
                        ),
                        now,
                        ctx,
                    );
                }
                (SessionState::Creating, Some(Substate::Placing), true) => {
                    let server = record.server.clone();
                    let abandon_id = record.abandon_id();
                    let waited = ctx.config.agent_timeout.as_secs();
                    if let Some(server) = server {
                        // It may still appear later: ask for it to go.
                        self.send(Instruction::Delete {
                            server: server.clone(),
                            session: id.clone(),
                            id: abandon_id,
                        });
                        self.attempt_failed(
                            &id,
                            format!(
                                "the agent of server {server} did not answer within {waited} s"
                            ),
                            now,
                            ctx,
                        );
                    }
                }
                _ => {}
            }
        }
    }

    pub(in crate::fleet) fn session_deadline_due(&self, now: Instant) -> bool {
        self.sessions
            .deadlines
            .first()
            .is_some_and(|(at, _)| *at <= now)
    }

    pub(in crate::fleet) fn after_server_change(
        &mut self,
        server: &ServerId,
        now: Instant,
        ctx: &Ctx<'_>,
    ) {
        self.drain_queue_onto(server, now, ctx);
    }

    pub(in crate::fleet) fn emit_close(&mut self, server: &ServerId, force: bool, ctx: &Ctx<'_>) {
        self.emit_with(ctx.events, || FleetEvent::ServerClosed {
            server: server.clone(),
            force,
        });
    }

    pub(in crate::fleet) fn emit_open(&mut self, server: &ServerId, ctx: &Ctx<'_>) {
        self.emit_with(ctx.events, || FleetEvent::ServerOpened {
            server: server.clone(),
        });
    }
}
