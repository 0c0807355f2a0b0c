//! Drains: servers closed for maintenance and followed until their
//! sessions end, with an optional deadline that reports or deletes.
//!
//! A drain is its holds. DrainServers places on each server a hold
//! carrying the drain's [`DrainSpec`] (id, deadline, what to do then), so
//! a drain is stored, restored and replicated exactly as holds are, and
//! ends with its last hold. What the state adds is an index (drain id →
//! the servers given its hold, and the deadlines to act on), so that
//! describing a drain or acting at its deadline never walks the fleet.
//! The index is kept where holds come and go (a drain, an open, a load, a
//! replicated change, a server's removal), and every read checks a member
//! against the server's holds anyway, so an entry that outlived its hold
//! is only skipped.

use std::{
    collections::BTreeSet,
    ops::Bound,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{
    error::{FailureCode, FieldViolation, FleetError, ItemFailure, ItemResult},
    handle::Fleet,
    holds::{self, Expiry, MAX_HOLD_DURATION},
    model::{DrainSpec, Hold, HoldKind, OnDeadline, ServerId, ServerRecord, SessionState},
    page_token::fingerprint,
    persist::{self, AuditItem},
    query,
    servers::{CloseItem, CloseStep, judge_close},
    state::State,
    validate::{precheck, validate_batch_size, validate_reason},
};

/// The hold name a drain uses when the request names none.
pub const DEFAULT_DRAIN_HOLD_NAME: &str = "drain";

/// The most drains a DescribeDrains page holds (and its default).
pub const MAX_DRAIN_PAGE: usize = 100;

/// A DescribeDrains page stops before a drain that would take it past
/// this many servers (it always holds one drain): a drain has up to 1,000
/// servers, and a reply must stay far below gRPC's 4 MiB.
pub const PAGE_SERVER_BUDGET: usize = 10_000;

/// When a drain stops waiting, as asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DrainDeadline {
    /// Never: the drain waits until its sessions end.
    #[default]
    None,
    /// At this wall time (`Deadline`).
    At(SystemTime),
    /// This long from now (`DeadlineIn`).
    In(Duration),
}

/// A DrainServers call, checked for its form by the API adapter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainRequest {
    /// The servers, in request order.
    pub server_ids: Vec<String>,
    /// Why (may be empty).
    pub reason: String,
    /// The holds' name (empty: [`DEFAULT_DRAIN_HOLD_NAME`]).
    pub hold_name: String,
    /// When to stop waiting.
    pub deadline: DrainDeadline,
    /// What to do then.
    pub on_deadline: OnDeadline,
    /// Close even below a capacity floor.
    pub override_floor: bool,
}

impl DrainRequest {
    /// The holds' name.
    pub fn hold_name(&self) -> &str {
        if self.hold_name.is_empty() {
            DEFAULT_DRAIN_HOLD_NAME
        } else {
            &self.hold_name
        }
    }
}

/// What DrainServers did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOutcome {
    /// The new drain's id; `None` when no item succeeded (no drain made).
    pub drain_id: Option<String>,
    /// One result per item, in order.
    pub results: Vec<ItemResult>,
}

/// A DescribeDrains query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainQuery {
    /// Only these drains (none: all).
    pub drain_ids: Vec<String>,
    /// The previous page's token.
    pub next_token: String,
    /// The page size.
    pub max_results: Option<i32>,
}

/// Where a drain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainState {
    /// Sessions are left, and the deadline (if any) is ahead.
    Draining,
    /// None of its servers runs a session.
    Drained,
    /// The deadline passed with sessions left.
    DeadlinePassed,
}

/// One drain as DescribeDrains shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainView {
    /// Its id.
    pub id: String,
    /// Where it stands.
    pub state: DrainState,
    /// Its holds' name.
    pub hold_name: String,
    /// Who started it.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// When it started.
    pub started: SystemTime,
    /// Its deadline.
    pub deadline: Option<SystemTime>,
    /// What it does then.
    pub on_deadline: OnDeadline,
    /// Its servers (still holding its hold), in id order, each with the
    /// sessions left on it.
    pub servers: Vec<(String, u32)>,
    /// The sessions left on all of them.
    pub sessions_left: u32,
    /// How many of them still run a session.
    pub busy_servers: u32,
}

/// A page of drains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainPage {
    /// The drains, in id order.
    pub drains: Vec<DrainView>,
    /// The next page's token, if more may follow.
    pub next_token: Option<String>,
}

/// `server`'s hold of drain `id`, if it has one.
fn hold_of<'a>(server: &'a ServerRecord, id: &str) -> Option<&'a Hold> {
    server
        .holds
        .iter()
        .find(|h| h.drain.as_ref().is_some_and(|d| &*d.id == id))
}

impl State {
    /// Notes that server `id`'s holds went from ones carrying the drains
    /// `before` to `after` (a load, a replicated change, a removal).
    pub(in crate::fleet) fn drain_holds_replaced(
        &mut self,
        id: &ServerId,
        before: &[Arc<DrainSpec>],
        after: &[Hold],
    ) {
        for spec in before {
            if !after
                .iter()
                .any(|h| h.drain.as_ref().is_some_and(|d| d.id == spec.id))
            {
                self.drains.leave(&spec.id, id);
            }
        }
        for spec in after.iter().filter_map(|h| h.drain.as_ref()) {
            self.drains.join(spec, id);
        }
    }

    /// Notes that `hold`, of server `id`, was removed.
    pub(in crate::fleet) fn hold_removed(&mut self, id: &str, hold: &Hold) {
        if let Some(spec) = &hold.drain {
            self.drains.leave(&spec.id, id);
        }
    }

    /// Whether a drain's deadline is due at `now`.
    pub(in crate::fleet) fn drain_deadline_due(&self, now: Instant) -> bool {
        self.drains
            .deadlines
            .first()
            .is_some_and(|(at, _)| *at <= self.hold_expiries.wall(now))
    }

    /// Acts on every drain whose deadline is due at `now`: reports the
    /// servers still busy, or asks their agents to delete the sessions
    /// left, as each drain says; either way the audit log records it
    /// (`DrainDeadline`). Work bounded by the drains' servers (at most
    /// 1,000 each) and their sessions.
    pub(in crate::fleet) fn process_drain_deadlines(&mut self, now: Instant) {
        let wall = self.hold_expiries.wall(now);
        while let Some((at, _)) = self.drains.deadlines.first()
            && *at <= wall
        {
            let Some((_, drain)) = self.drains.deadlines.pop_first() else {
                break;
            };
            let Some(members) = self.drains.members.get(&drain) else {
                continue;
            };
            let members: Vec<ServerId> = members.iter().cloned().collect();
            let mut items = Vec::new();
            let mut action = None;
            for server_id in members {
                let Some(server) = self.servers.get(&server_id) else {
                    continue;
                };
                let Some(spec) = hold_of(server, &drain).and_then(|h| h.drain.clone()) else {
                    continue;
                };
                action = Some(spec.on_deadline);
                let left: Vec<String> = server.live_sessions().map(|s| s.id.to_owned()).collect();
                if left.is_empty() {
                    continue;
                }
                match spec.on_deadline {
                    OnDeadline::Report => items.push(AuditItem::new(
                        &server_id,
                        "SESSIONS_REMAIN".to_owned(),
                        format!(
                            "{} session(s) still running at the deadline of drain {drain}",
                            left.len()
                        ),
                    )),
                    OnDeadline::DeleteSessions => {
                        for session in left {
                            items.push(self.delete_at_deadline(&session, &server_id, &drain));
                        }
                    }
                }
            }
            tracing::info!(
                drain = %drain,
                on_deadline = ?action,
                items = items.len(),
                "drain deadline passed"
            );
            if !items.is_empty() {
                self.audit_own_act(persist::wall_clock(), "DrainDeadline", || items);
            }
        }
    }

    /// Asks the agent of `server` to delete `session`, left at the deadline
    /// of `drain`; says how that went, for the audit log.
    fn delete_at_deadline(&mut self, session: &str, server: &ServerId, drain: &str) -> AuditItem {
        let record = self
            .sessions
            .records
            .get_key_value(session)
            .map(|(id, r)| (id.clone(), r.state, r.server.clone()));
        match record {
            Some((id, state, Some(on)))
                if on == *server
                    && state != SessionState::Deleting
                    && state != SessionState::Deleted =>
            {
                self.ask_to_delete(&id, on);
                AuditItem::new(
                    session,
                    AuditItem::OK.to_owned(),
                    format!("deleted at the deadline of drain {drain} (server {server})"),
                )
            }
            Some((_, SessionState::Deleting, _)) => AuditItem::new(
                session,
                AuditItem::OK.to_owned(),
                format!("being deleted already at the deadline of drain {drain}"),
            ),
            _ => AuditItem::new(
                session,
                "NOT_DELETED".to_owned(),
                format!(
                    "reported by server {server}'s agent, but the broker has no record to delete at the deadline of drain {drain}"
                ),
            ),
        }
    }
}

/// The deadline `asked` at the broker's time `wall`, at the stores'
/// precision; or why it cannot be used.
fn resolve_deadline(
    asked: DrainDeadline,
    wall: SystemTime,
) -> Result<Option<SystemTime>, FleetError> {
    let (field, expiry) = match asked {
        DrainDeadline::None => return Ok(None),
        DrainDeadline::At(at) => ("Deadline", Expiry::At(at)),
        DrainDeadline::In(d) => ("DeadlineIn", Expiry::In(d)),
    };
    expiry.resolve(wall).map_err(|_| {
        let why = match asked {
            DrainDeadline::In(d) if d.is_zero() => "must be positive".to_owned(),
            DrainDeadline::At(at) if at <= wall => "must be in the future".to_owned(),
            _ => format!(
                "must be at most {} days ahead",
                MAX_HOLD_DURATION.as_secs() / 86_400
            ),
        };
        FleetError::invalid(field, why)
    })
}

/// The failure of a server that has a hold of the drain's name already.
fn already_held(server: &ServerRecord, name: &str) -> ItemFailure {
    let what = server
        .holds
        .iter()
        .find(|h| holds::is_named(h, name))
        .map(|h| {
            let by = match &h.drain {
                Some(d) => format!("drain {}", d.id),
                None => "a close".to_owned(),
            };
            format!("{by}, by {}", h.actor)
        })
        .unwrap_or_default();
    ItemFailure::new(
        FailureCode::AlreadyDraining,
        format!(
            "The server already has a hold named {name:?} ({what}); open it first, or drain with another HoldName."
        ),
    )
}

/// Checks a drain id of DescribeDrains' `DrainIds`.
fn check_drain_id(id: &str) -> Result<(), String> {
    if id.len() <= 64 && uuid::Uuid::try_parse(id).is_ok() {
        Ok(())
    } else {
        Err("must be a DrainId (a UUID)".to_owned())
    }
}

impl Fleet {
    /// Drains servers on behalf of `actor`. See `servers.proto`.
    pub async fn drain_servers(
        &self,
        request: &DrainRequest,
        actor: &str,
    ) -> Result<DrainOutcome, FleetError> {
        let (outcome, durable) = self.drain_servers_locked(request, actor)?;
        durable.wait().await?;
        Ok(outcome)
    }

    fn drain_servers_locked(
        &self,
        request: &DrainRequest,
        actor: &str,
    ) -> Result<(DrainOutcome, persist::Durable), FleetError> {
        validate_batch_size("Servers", request.server_ids.len())?;
        let mut violations = Vec::new();
        if let Err(why) = validate_reason(&request.reason) {
            violations.push(FieldViolation::new("Reason", why));
        }
        if !request.hold_name.is_empty()
            && let Err(why) = holds::validate_hold_name(&request.hold_name)
        {
            violations.push(FieldViolation::new("HoldName", why));
        }
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        let pre = precheck(request.server_ids.iter().map(String::as_str));
        let name: Arc<str> = Arc::from(request.hold_name());
        let actor: Arc<str> = Arc::from(actor);
        let since = persist::wall_clock();
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        let deadline = resolve_deadline(request.deadline, state.hold_expiries.wall(now))?;
        let spec = Arc::new(DrainSpec {
            id: Arc::from(uuid::Uuid::new_v4().to_string()),
            deadline,
            on_deadline: request.on_deadline,
        });
        let mut judge = self.close_judge(&state, now);
        let mut results = Vec::with_capacity(request.server_ids.len());
        let mut drained = 0_usize;
        for (server_id, pre) in request.server_ids.iter().zip(pre) {
            // Judged as a CloseServers item with Force and this hold name.
            let item = CloseItem {
                server_id: server_id.clone(),
                force: true,
                hold_name: name.to_string(),
                override_floor: request.override_floor,
                ..CloseItem::default()
            };
            judge.count_floors_for(&state, &item);
            let version = state.next_state_version();
            let server = state.servers.get_mut(server_id.as_str());
            let step = judge_close(server.as_deref().map(|s| &**s), &item, pre, &mut judge);
            let (closes, id) = match (step, server) {
                (Err(failure), _) => {
                    results.push(Err(failure));
                    continue;
                }
                (Ok(CloseStep::Held), Some(server)) => {
                    results.push(Err(already_held(server, &name)));
                    continue;
                }
                (Ok(CloseStep::Place { closes, .. }), Some(server)) => {
                    server.holds.reserve_exact(1);
                    server.holds.push(Hold {
                        kind: HoldKind::Closed,
                        name: name.clone(),
                        actor: actor.clone(),
                        since,
                        reason: request.reason.clone(),
                        expires_at: None,
                        drain: Some(spec.clone()),
                    });
                    server.state_version = version;
                    (closes, server.id.clone())
                }
                (Ok(_), None) => {
                    results.push(Err(ItemFailure::not_found()));
                    continue;
                }
            };
            results.push(Ok(()));
            drained += 1;
            state.drains.join(&spec, &id);
            state.server_state_changed(&id);
            if closes {
                state.emit_close(&id, true, &ctx);
            }
        }
        let durable = self.commit(&mut state);
        drop(state);
        if drained > 0 {
            tracing::info!(drain = %spec.id, servers = drained, deadline = ?spec.deadline, "drain started");
        }
        let outcome = DrainOutcome {
            drain_id: (drained > 0).then(|| spec.id.to_string()),
            results,
        };
        Ok((outcome, durable))
    }

    /// A page of drains (see `servers.proto`'s DescribeDrains).
    pub fn describe_drains(&self, q: &DrainQuery) -> Result<DrainPage, FleetError> {
        let mut violations = Vec::new();
        let ids = query::id_list("DrainIds", &q.drain_ids, check_drain_id, &mut violations);
        let page_size = match q.max_results {
            None => MAX_DRAIN_PAGE,
            Some(n) if usize::try_from(n).is_ok_and(|n| (1..=MAX_DRAIN_PAGE).contains(&n)) => {
                n as usize
            }
            Some(n) => {
                violations.push(FieldViolation::new(
                    "MaxResults",
                    format!("must be 1 to {MAX_DRAIN_PAGE}; got {n}"),
                ));
                MAX_DRAIN_PAGE
            }
        };
        if !violations.is_empty() {
            return Err(FleetError::InvalidArgument(violations));
        }
        let fingerprint = || {
            fingerprint(std::iter::once("drains").chain(ids.iter().flatten().map(String::as_str)))
        };
        let wall = SystemTime::now();
        let after = self.resume_after(&q.next_token, fingerprint, wall)?;
        let now = Instant::now();
        let state = self.read(now);
        let broker_wall = state.hold_expiries.wall(now);
        let start = match &after {
            Some(a) => Bound::Excluded(a.as_str()),
            None => Bound::Unbounded,
        };
        let candidates: Box<dyn Iterator<Item = (&Arc<str>, &BTreeSet<ServerId>)>> = match &ids {
            Some(ids) => Box::new(
                ids.iter()
                    .filter(|id| after.as_ref().is_none_or(|a| id.as_str() > a.as_str()))
                    .filter_map(|id| state.drains.members.get_key_value(id.as_str())),
            ),
            None => Box::new(
                state
                    .drains
                    .members
                    .range::<str, _>((start, Bound::Unbounded)),
            ),
        };
        let mut drains = Vec::new();
        let mut servers_in_page = 0;
        let mut more = false;
        for (id, members) in candidates {
            let Some(view) = view_of(&state, id, members, broker_wall) else {
                continue;
            };
            if drains.len() == page_size
                || (!drains.is_empty() && servers_in_page + view.servers.len() > PAGE_SERVER_BUDGET)
            {
                more = true;
                break;
            }
            servers_in_page += view.servers.len();
            drains.push(view);
        }
        drop(state);
        let next_token = match drains.last() {
            Some(last) if more => Some(self.tokens.issue(&fingerprint(), &last.id, wall)),
            _ => None,
        };
        Ok(DrainPage { drains, next_token })
    }
}

/// Drain `id` as it stands in `state` at the broker's time `wall`; `None`
/// when none of `members` holds its hold any more.
fn view_of(
    state: &State,
    id: &str,
    members: &BTreeSet<ServerId>,
    wall: SystemTime,
) -> Option<DrainView> {
    let mut first: Option<&Hold> = None;
    let mut servers = Vec::new();
    let mut sessions_left = 0_u32;
    let mut busy_servers = 0_u32;
    for server_id in members {
        let Some(server) = state.servers.get(server_id) else {
            continue;
        };
        let Some(hold) = hold_of(server, id) else {
            continue;
        };
        first.get_or_insert(hold);
        let left = u32::try_from(server.live_sessions().count()).unwrap_or(u32::MAX);
        sessions_left = sessions_left.saturating_add(left);
        busy_servers += u32::from(left > 0);
        servers.push((server_id.to_string(), left));
    }
    let hold = first?;
    let spec = hold.drain.as_deref()?;
    let state = if sessions_left == 0 {
        DrainState::Drained
    } else if spec.deadline.is_some_and(|d| d <= wall) {
        DrainState::DeadlinePassed
    } else {
        DrainState::Draining
    };
    Some(DrainView {
        id: id.to_owned(),
        state,
        hold_name: hold.name.to_string(),
        actor: hold.actor.to_string(),
        reason: hold.reason.clone(),
        started: hold.since,
        deadline: spec.deadline,
        on_deadline: spec.on_deadline,
        servers,
        sessions_left,
        busy_servers,
    })
}
