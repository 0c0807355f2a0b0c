//! Agents' operations: register, heartbeat, deregister, and the
//! instruction stream with its answers.

use std::sync::Arc;

use tokio::{sync::mpsc, time::Instant};

use super::{
    error::{AgentStep, FieldViolation, FleetError},
    handle::Fleet,
    model::{Heartbeat, ServerDescription, ServerId, ServerRecord, SessionState, Substate},
    persist,
    sessions::{
        Instruction, InstructionKind, InstructionOutcome, SessionId, validate::check_session_id,
    },
    state::{Ctx, State},
    validate::{agent_text, validate_description, validate_heartbeat, validate_server_id},
};

impl Fleet {
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
        let (new, was_silent) = match state.servers.get_mut(id) {
            Some(server) => {
                server.description = description;
                server.last_seen = now;
                server.last_seen_wall = wall;
                server.agent_departed = false;
                (false, std::mem::replace(&mut server.silence_noted, false))
            }
            None => {
                let id: ServerId = Arc::from(id);
                let state_version = state.next_state_version();
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
                        state_version,
                        registered_at: wall,
                        last_seen: now,
                        last_seen_wall: wall,
                        agent_departed: false,
                        silence_noted: false,
                    }),
                );
                (true, true)
            }
        };
        state.note_removable(now + self.config.remove_after);
        if was_silent && let Some(id) = state.servers.get(id).map(|s| s.id.clone()) {
            // The registration is audited itself.
            state.silence_ended(&id, now, &ctx, false);
        }
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

    /// Opens the instruction channel of `server`'s agent, replacing any
    /// older one, and resends what is still waiting for an answer.
    pub fn subscribe_instructions(
        &self,
        server: &str,
    ) -> Result<mpsc::UnboundedReceiver<Instruction>, FleetError> {
        validate_server_id(server).map_err(|why| FleetError::invalid("ServerId", why))?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.write(Instant::now());
        let id = state
            .servers
            .get(server)
            .map(|s| s.id.clone())
            .ok_or_else(|| {
                FleetError::ServerNotFound(server.to_string(), AgentStep::StreamInstructions)
            })?;
        for record in state.sessions.records.values() {
            if record.server.as_ref() != Some(&id) {
                continue;
            }
            let resend = match (record.state, record.substate, &record.order) {
                (SessionState::Creating, Some(Substate::Placing), Some(order)) => {
                    Some(Instruction::Create {
                        server: id.clone(),
                        session: record.id.clone(),
                        id: record.create_id(),
                        order: order.clone(),
                        permissions_file: record.permissions_file.clone(),
                    })
                }
                (SessionState::Deleting, _, _) => Some(Instruction::Delete {
                    server: id.clone(),
                    session: record.id.clone(),
                    id: record.delete_id(),
                }),
                _ => None,
            };
            if let Some(instruction) = resend {
                let _ = tx.send(instruction);
            }
        }
        state.sessions.agents.insert(id, tx);
        Ok(rx)
    }

    /// One instruction channel for many servers (the simulated fleet).
    pub fn subscribe_instructions_many(
        &self,
        servers: &[ServerId],
    ) -> mpsc::UnboundedReceiver<Instruction> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.write(Instant::now());
        for id in servers {
            state.sessions.agents.insert(id.clone(), tx.clone());
        }
        rx
    }

    /// Records an agent's answer to an instruction. Answers about sessions
    /// that are no longer the agent's business are ignored.
    pub fn report_instruction(
        &self,
        server: &str,
        session: &str,
        kind: InstructionKind,
        outcome: InstructionOutcome,
    ) -> Result<(), FleetError> {
        let mut violations = Vec::new();
        if let Err(why) = validate_server_id(server) {
            violations.push(FieldViolation::new("ServerId", why));
        }
        if let Err(why) = check_session_id(session) {
            violations.push(FieldViolation::new("SessionId", why));
        }
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        // The reason becomes the session's StateReason, shown to every
        // caller and stored: an agent's whole output (or a hostile
        // megabyte) must not be, nor control characters. Cleaned before
        // the lock, since its cost is the agent's choice.
        let outcome = match outcome {
            InstructionOutcome::Failed(why) => InstructionOutcome::Failed(agent_text(&why)),
            done => done,
        };
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        if !state.servers.contains_key(server) {
            return Err(FleetError::ServerNotFound(
                server.to_string(),
                AgentStep::ReportInstructionResult,
            ));
        }
        let id: SessionId = Arc::from(session);
        let Some(record) = state.sessions.record_mut(&id) else {
            return Ok(());
        };
        if record.server.as_deref() != Some(server) {
            return Ok(());
        }
        match (kind, outcome) {
            (InstructionKind::Create, InstructionOutcome::Done { ready }) => {
                if record.state == SessionState::Creating
                    && record.substate == Some(Substate::Placing)
                {
                    if ready {
                        record.state = SessionState::Ready;
                        record.substate = None;
                    } else {
                        record.substate = Some(Substate::PendingPreparation);
                    }
                    state.set_deadline(&id, None);
                }
            }
            (InstructionKind::Create, InstructionOutcome::Failed(why)) => {
                if record.state == SessionState::Creating
                    && record.substate == Some(Substate::Placing)
                {
                    state.set_deadline(&id, None);
                    let why = format!("server {server} could not create it: {why}");
                    state.attempt_failed(&id, why, now, &ctx);
                }
            }
            (InstructionKind::Delete, InstructionOutcome::Done { .. }) => {
                if record.state != SessionState::Deleted {
                    state.mark_deleted(&id, "Deleted on its server.".into(), now, &ctx);
                }
                // The agent says it is gone: it stops occupying the server
                // now, not at the next heartbeat.
                let server_id = state.servers.get(server).map(|s| s.id.clone());
                if let Some(server_id) = server_id {
                    state.forget_reported(&server_id, &id, &ctx);
                    state.drain_queue_onto(&server_id, now, &ctx);
                }
            }
            (InstructionKind::Delete, InstructionOutcome::Failed(why)) => {
                if record.state == SessionState::Deleting {
                    record.state = SessionState::Ready;
                    record.state_reason = format!("Deletion failed on its server: {why}");
                }
            }
            (InstructionKind::UpdatePermissions, InstructionOutcome::Failed(why)) => {
                record.state_reason = format!("Permissions update failed on its server: {why}");
            }
            (InstructionKind::UpdatePermissions, InstructionOutcome::Done { .. }) => {}
            // Answered through `report_screenshot`, by instruction id.
            (InstructionKind::GetScreenshot, _) => {}
        }
        drop(self.commit(&mut state));
        Ok(())
    }
}

impl State {
    /// Records a heartbeat for `id`; false if the server is unknown.
    fn apply_heartbeat(
        &mut self,
        id: &str,
        report: Heartbeat,
        now: Instant,
        ctx: &Ctx<'_>,
    ) -> bool {
        let Some(server) = self.servers.get_mut(id) else {
            return false;
        };
        report.update_host(&mut server.description.host);
        server.dcv_server_healthy = report.dcv_server_healthy;
        server.logged_in_users = report.logged_in_users;
        let old = self.by_load.update(server, |server| {
            std::mem::replace(&mut server.sessions, report.sessions)
        });
        server.last_seen = now;
        server.last_seen_wall = persist::wall_clock();
        let returned = std::mem::replace(&mut server.agent_departed, false);
        let was_silent = std::mem::replace(&mut server.silence_noted, false);
        let id = server.id.clone();
        if returned {
            self.server_state_changed(&id);
        }
        if was_silent {
            self.silence_ended(&id, now, ctx, true);
        }
        self.liveness_changed(&id);
        self.reconcile_report(&id, &old, now, ctx);
        true
    }
}
