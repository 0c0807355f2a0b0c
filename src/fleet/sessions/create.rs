//! CreateSessions: Requirements evaluation, placement and its re-check
//! under the write lock.

use std::{sync::Arc, time::SystemTime};

use tokio::time::Instant;

use crate::telemetry::otlp::TRACE_TARGET;

use super::{
    CreateSpec, FleetEvent, Instruction, MAX_ITEMS_PER_SECTION, MAX_RECHECK_MISSES,
    MAX_REQUEST_EVALUATION_COST, MAX_SECTION_EVALUATION_COST, Order, PlacementStrategy, STEP_COST,
    SessionId, SessionRecord, SessionView, Substate,
    validate::{has_room, validate_create},
};
use crate::fleet::{
    error::{FailureCode, FleetError, ItemFailure},
    handle::Fleet,
    load_index,
    model::{FastMap, FastSet, Placement, ServerId, SessionState},
    persist::{self, Durable},
    requirements::Requirements,
    state::{Ctx, State},
    validate::validate_batch_size,
};
#[cfg(test)]
use crate::fleet::{model::ServerRecord, sessions::validate::can_take};

impl Fleet {
    /// Creates sessions; one result per item, in order. Each accepted
    /// session is handed to `visit` (under the lock) with its index.
    ///
    /// The work under the fleet's lock is bounded whatever the request
    /// holds: items are validated and their Requirements parsed first;
    /// each distinct expression is then evaluated against the fleet under
    /// the read lock, in slices of [`MAX_SECTION_EVALUATION_COST`], within
    /// the request's budget ([`MAX_REQUEST_EVALUATION_COST`]); and the
    /// items are placed in write sections of at most
    /// [`MAX_ITEMS_PER_SECTION`], each choice re-checked against the
    /// server as it is then. Observers may thus see part of a batch placed
    /// before the rest; each item is placed (or queued) whole.
    pub async fn create_sessions(
        &self,
        specs: &[CreateSpec],
        visit: impl FnMut(usize, SessionView<'_>),
    ) -> Result<Vec<Result<(), ItemFailure>>, FleetError> {
        // Exported with --otlp-endpoint only; a disabled call site else.
        let placement = tracing::info_span!(target: TRACE_TARGET, "placement", items = specs.len());
        let (results, durables) =
            placement.in_scope(|| self.create_sessions_locked(specs, visit))?;
        for durable in durables {
            durable.wait().await?;
        }
        Ok(results)
    }

    /// The servers `requirements` matches now, evaluated under the read
    /// lock in slices of at most [`MAX_SECTION_EVALUATION_COST`], so that
    /// writers get in between. A server that joins or changes meanwhile
    /// may be missed or kept: the choice is re-checked under the write
    /// lock ([`State::choose_among`]).
    fn matching_servers(&self, requirements: &Requirements) -> FastSet<ServerId> {
        use std::ops::Bound;
        let per_slice =
            usize::try_from((MAX_SECTION_EVALUATION_COST / requirements.cost().max(1)).max(1))
                .unwrap_or(usize::MAX);
        let mut matching = FastSet::default();
        let mut after: Option<ServerId> = None;
        loop {
            let state = self.state.read();
            let range = match &after {
                None => state.order.range::<ServerId, _>(..),
                Some(last) => state
                    .order
                    .range::<ServerId, _>((Bound::Excluded(last), Bound::Unbounded)),
            };
            let mut seen = 0;
            for id in range.take(per_slice) {
                seen += 1;
                if state
                    .servers
                    .get(id)
                    .is_some_and(|server| requirements.matches(server))
                {
                    matching.insert(id.clone());
                }
                after = Some(id.clone());
            }
            drop(state);
            if seen < per_slice {
                return matching;
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn create_sessions_locked(
        &self,
        specs: &[CreateSpec],
        mut visit: impl FnMut(usize, SessionView<'_>),
    ) -> Result<(Vec<Result<(), ItemFailure>>, Vec<Durable>), FleetError> {
        validate_batch_size("Sessions", specs.len())?;
        // Parsing and validation happen before the lock is taken.
        let mut orders: Vec<Result<Arc<Order>, ItemFailure>> = specs
            .iter()
            .map(|spec| validate_create(spec).map(Arc::new))
            .collect();
        // Each distinct expression, with the servers it matches: charged
        // to the request's budget once, evaluated once, outside the write
        // lock.
        let servers = self.len().max(1) as u64;
        // Per group: its expression (from its first order) and matches.
        let mut groups: Vec<(Arc<Order>, FastSet<ServerId>)> = Vec::new();
        let mut group_of: Vec<Option<usize>> = vec![None; orders.len()];
        let mut by_fingerprint: FastMap<u64, Vec<usize>> = FastMap::default();
        let mut spent: u64 = 0;
        for (index, slot) in orders.iter_mut().enumerate() {
            let Ok(order) = slot else { continue };
            let Some(requirements) = &order.requirements else {
                continue;
            };
            let known = by_fingerprint
                .get(&requirements.fingerprint())
                .and_then(|candidates| {
                    candidates.iter().copied().find(|&g| {
                        groups[g]
                            .0
                            .requirements
                            .as_ref()
                            .is_some_and(|r| r.same_as(requirements))
                    })
                });
            if let Some(g) = known {
                group_of[index] = Some(g);
                continue;
            }
            let cost = requirements.cost().saturating_mul(servers);
            if spent.saturating_add(cost) > MAX_REQUEST_EVALUATION_COST {
                *slot = Err(ItemFailure::new(
                    FailureCode::InvalidRequirements,
                    format!(
                        "Requirements: evaluating this request's distinct Requirements against \
                         the {servers} servers would take more than the {MAX_REQUEST_EVALUATION_COST} \
                         units one request may use (an expression costs about a unit per \
                         character, per server); send fewer distinct or shorter expressions per \
                         request."
                    ),
                ));
                continue;
            }
            spent += cost;
            by_fingerprint
                .entry(requirements.fingerprint())
                .or_default()
                .push(groups.len());
            group_of[index] = Some(groups.len());
            groups.push((order.clone(), FastSet::default()));
        }
        for (order, matching) in &mut groups {
            if let Some(requirements) = &order.requirements {
                *matching = self.matching_servers(requirements);
            }
        }

        let mut results = Vec::with_capacity(specs.len());
        let mut durables = Vec::new();
        let mut items = specs.iter().zip(orders).zip(group_of).enumerate();
        let mut next = items.next();
        while next.is_some() {
            let now = Instant::now();
            let wall = persist::wall_clock();
            let ctx = self.ctx();
            let mut state = self.write(now);
            let mut accepted = Vec::new();
            let mut placed = 0;
            let mut work = 0;
            while let Some((index, ((spec, order), group))) = next.take() {
                let order = match order {
                    Ok(order) => order,
                    Err(failure) => {
                        results.push(Err(failure));
                        next = items.next();
                        continue;
                    }
                };
                let target = match group.and_then(|g| groups.get_mut(g)) {
                    Some((_, matching)) => {
                        state.choose_among(&order, matching, now, &ctx, &mut work)
                    }
                    None => state.choose_server(&order, &[], now, &ctx),
                };
                let result = state.accept(spec, order, target, now, wall, &ctx);
                if let Ok(id) = &result {
                    accepted.push((index, id.clone()));
                }
                results.push(result.map(|_| ()));
                placed += 1;
                next = items.next();
                if placed >= MAX_ITEMS_PER_SECTION || work >= MAX_SECTION_EVALUATION_COST {
                    break;
                }
            }
            for (index, id) in accepted {
                if let Some(record) = state.sessions.records.get(&id) {
                    let unreachable_after = self.config.unreachable_after;
                    visit(
                        index,
                        SessionView::new(record, &state.servers, now, unreachable_after),
                    );
                }
            }
            durables.push(self.commit(&mut state));
        }
        Ok((results, durables))
    }
}

impl State {
    /// The best server for `order`, by the placement strategy: the first
    /// server that can take it in the load index's order for the strategy
    /// (see `load_index`), without scanning the fleet. Requirements are
    /// evaluated here, under the lock, only within what is left of the
    /// operation's budget (`Ctx::evaluation_budget`): past it, no server
    /// is found (the session is queued or fails). CreateSessions evaluates
    /// them before it takes the lock (see [`State::choose_among`]); this
    /// is for retries and tests.
    pub(in crate::fleet) fn choose_server(
        &self,
        order: &Order,
        exclude: &[ServerId],
        now: Instant,
        ctx: &Ctx<'_>,
    ) -> Option<ServerId> {
        let budget = &ctx.evaluation_budget;
        let cost = order.requirements.as_ref().map_or(0, |r| r.cost());
        let takes = |entry: &&(u32, ServerId)| {
            let (load, id) = entry;
            if exclude.contains(id) {
                return false;
            }
            let server = self.servers.get(id);
            debug_assert!(server.is_some(), "the load index holds unknown server {id}");
            let Some(server) = server else {
                return false;
            };
            debug_assert_eq!(
                load_index::load_of(server),
                *load,
                "the load index is behind server {id}'s sessions"
            );
            if !has_room(server, order, now, ctx.config.unreachable_after) {
                return false;
            }
            let Some(requirements) = &order.requirements else {
                return true;
            };
            budget.set(budget.get().saturating_sub(cost));
            requirements.matches(server)
        };
        let affordable = |_: &&(u32, ServerId)| budget.get() >= cost;
        let chosen = match ctx.config.placement {
            PlacementStrategy::Spread => self
                .by_load
                .least_loaded_first()
                .take_while(affordable)
                .find(takes),
            PlacementStrategy::Pack => self
                .by_load
                .most_loaded_first()
                .take_while(affordable)
                .find(takes),
        };
        chosen.map(|(_, id)| id.clone())
    }

    /// The best server for `order` among `matching`, the servers its
    /// Requirements matched when evaluated outside the lock (see
    /// [`Fleet::matching_servers`]). The choice is re-checked against the
    /// server as it is now: room and availability always (a close that
    /// got in first wins), the Requirements once more on the chosen server
    /// only, since its agent may have re-registered in between; a server
    /// that no longer matches leaves `matching`. Adds the work done to
    /// `work`, in [`Requirements::cost`] units.
    fn choose_among(
        &self,
        order: &Order,
        matching: &mut FastSet<ServerId>,
        now: Instant,
        ctx: &Ctx<'_>,
        work: &mut u64,
    ) -> Option<ServerId> {
        let requirements = order.requirements.as_ref()?;
        let unreachable_after = ctx.config.unreachable_after;
        for _ in 0..=MAX_RECHECK_MISSES {
            if matching.is_empty() {
                return None;
            }
            let best = if matching.len().saturating_mul(8) < self.servers.len() {
                // Few candidates: compare them directly rather than walk
                // the whole index past the others.
                *work += STEP_COST * matching.len() as u64;
                let candidates = matching
                    .iter()
                    .filter_map(|id| self.servers.get(id))
                    .filter(|s| has_room(s, order, now, unreachable_after))
                    .map(|s| (load_index::load_of(s), &s.id));
                match ctx.config.placement {
                    PlacementStrategy::Spread => candidates.min(),
                    PlacementStrategy::Pack => {
                        candidates.min_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)))
                    }
                }
                .map(|(_, id)| id.clone())
            } else {
                let mut walk: Box<dyn Iterator<Item = &(u32, ServerId)>> =
                    match ctx.config.placement {
                        PlacementStrategy::Spread => Box::new(self.by_load.least_loaded_first()),
                        PlacementStrategy::Pack => Box::new(self.by_load.most_loaded_first()),
                    };
                walk.find(|(_, id)| {
                    *work += STEP_COST;
                    matching.contains(id)
                        && self
                            .servers
                            .get(id)
                            .is_some_and(|s| has_room(s, order, now, unreachable_after))
                })
                .map(|(_, id)| id.clone())
            };
            let id = best?;
            *work += requirements.cost();
            if self
                .servers
                .get(&id)
                .is_some_and(|s| requirements.matches(s))
            {
                return Some(id);
            }
            matching.remove(&id);
        }
        None
    }

    /// What [`State::choose_server`] did before the load index: a scan of
    /// every server. The index's tests hold it to the same choices.
    #[cfg(test)]
    pub(in crate::fleet) fn choose_server_by_scan(
        &self,
        order: &Order,
        exclude: &[ServerId],
        now: Instant,
        ctx: &Ctx<'_>,
    ) -> Option<ServerId> {
        let candidates = self.servers.values().filter(|s| {
            !exclude.contains(&s.id) && can_take(s, order, now, ctx.config.unreachable_after)
        });
        let load = |s: &ServerRecord| s.live_sessions().count();
        match ctx.config.placement {
            PlacementStrategy::Spread => {
                candidates.min_by(|a, b| load(a).cmp(&load(b)).then_with(|| a.id.cmp(&b.id)))
            }
            PlacementStrategy::Pack => {
                candidates.min_by(|a, b| load(b).cmp(&load(a)).then_with(|| a.id.cmp(&b.id)))
            }
        }
        .map(|s| s.id.clone())
    }

    /// Takes in one CreateSessions item whose server (if any) is chosen:
    /// places it, queues it, or says why not. Returns the new session's id.
    fn accept(
        &mut self,
        spec: &CreateSpec,
        order: Arc<Order>,
        target: Option<ServerId>,
        now: Instant,
        wall: SystemTime,
        ctx: &Ctx<'_>,
    ) -> Result<SessionId, ItemFailure> {
        if target.is_none() && !order.enqueue {
            self.sessions.placements.no_server += 1;
            return Err(ItemFailure::new(
                FailureCode::NoServerAvailable,
                "No DCV server is available for the session's Type and Requirements.",
            ));
        }
        let queue_max_size = ctx.config.queue_max_size;
        if target.is_none() && self.sessions.queue.len() >= queue_max_size {
            self.sessions.placements.queue_full += 1;
            return Err(ItemFailure::new(
                FailureCode::QueueFull,
                format!(
                    "No DCV server is available and the queue already holds {queue_max_size} requests."
                ),
            ));
        }
        if target.is_none() && !self.sessions.queue.admits(order.requirements.as_ref()) {
            self.sessions.placements.queue_full += 1;
            return Err(ItemFailure::new(
                FailureCode::QueueFull,
                format!(
                    "No DCV server is available, and the queue's distinct Requirements already \
                     cost nearly the {} units a check of the queue may take; queue it again when \
                     some have been placed, or reuse an expression already queued.",
                    super::queue::MAX_QUEUE_REQUIREMENTS_COST
                ),
            ));
        }
        let id: SessionId = Arc::from(uuid::Uuid::new_v4().to_string());
        self.sessions.insert_record(
            id.clone(),
            SessionRecord {
                id: id.clone(),
                name: order.name.clone(),
                owner: order.owner.clone(),
                kind: order.kind,
                server: None,
                state: SessionState::Creating,
                substate: Some(Substate::Placing),
                state_reason: String::new(),
                created_at: wall,
                order: Some(order),
                permissions_file: spec.permissions_file.clone(),
                tried: Vec::new(),
                deadline: None,
                forgotten: false,
                queue_position: None,
                deletions: 0,
                connections: 0,
                last_disconnection: None,
            },
        );
        match target {
            Some(server) => self.place(&id, &server, now, ctx),
            None => self.enqueue(&id, now, ctx),
        }
        Ok(id)
    }

    /// Reserves a slot for `session` on `server` and tells its agent.
    pub(in crate::fleet) fn place(
        &mut self,
        session: &SessionId,
        server: &ServerId,
        now: Instant,
        ctx: &Ctx<'_>,
    ) {
        let Some(record) = self.sessions.record_mut(session) else {
            return;
        };
        let Some(order) = record.order.clone() else {
            return;
        };
        record.server = Some(server.clone());
        record.state = SessionState::Creating;
        record.substate = Some(Substate::Placing);
        record.state_reason.clear();
        record.queue_position = None;
        record.tried.push(server.clone());
        // A new attempt on a new server: no client of an earlier one is
        // connected to it.
        record.connections = 0;
        record.last_disconnection = None;
        let permissions_file = record.permissions_file.clone();
        let id = record.create_id();
        if let Some(target) = self.servers.get_mut(server) {
            self.by_load.update(target, |target| {
                target.placing.push(Placement {
                    session: session.clone(),
                    kind: order.kind,
                    owner: order.owner.clone(),
                });
            });
        }
        self.set_deadline(session, Some(now + ctx.config.agent_timeout));
        self.emit(
            FleetEvent::SessionPlaced {
                session: session.clone(),
                server: server.clone(),
            },
            ctx.events,
        );
        self.sessions.placements.placed += 1;
        self.send(Instruction::Create {
            server: server.clone(),
            session: session.clone(),
            id,
            order,
            permissions_file,
        });
    }
}
