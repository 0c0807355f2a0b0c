//! Operators' server operations: close, open, describe.

use std::{sync::Arc, time::SystemTime};

use tokio::time::Instant;

use super::{
    availability::{self, Reason, Reasons},
    blast::{self, AffectedServer, BlastRadius},
    error::{FailureCode, FleetError, ItemFailure, ItemResult},
    handle::Fleet,
    holds::{self, Expiry},
    model::{DEFAULT_HOLD_NAME, Hold, HoldKind, ServerRecord},
    page_token, persist,
    query::{self, DescribeQuery, ValidQuery},
    state::State,
    validate::{precheck, validate_batch_size, validate_reason},
};

/// One CloseServers item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CloseItem {
    /// Server to close.
    pub server_id: String,
    /// Close even with running sessions.
    pub force: bool,
    /// Why (may be empty).
    pub reason: String,
    /// The hold to place (empty: [`DEFAULT_HOLD_NAME`]).
    pub hold_name: String,
    /// When the hold ends by itself.
    pub expiry: Expiry,
    /// Act only if the server's state version is this.
    pub expected_version: Option<u64>,
    /// Close even below a capacity floor.
    pub override_floor: bool,
}

/// One OpenServers item.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenItem {
    /// Server to open.
    pub server_id: String,
    /// The hold to remove (empty: [`DEFAULT_HOLD_NAME`]).
    pub hold_name: String,
    /// Act only if the server's state version is this.
    pub expected_version: Option<u64>,
}

/// A server as DescribeServers sees it: the record and its availability.
#[derive(Debug, Clone, Copy)]
pub struct ServerView<'a> {
    /// The record.
    pub record: &'a ServerRecord,
    /// Why it is unavailable, if it is.
    pub reasons: Reasons,
}

/// What a judged CloseServers item would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CloseStep {
    /// The server already has a hold of that name: nothing.
    Held,
    /// Place the hold, ending at the given time; `closes` when the server
    /// had no hold before.
    Place {
        expires_at: Option<SystemTime>,
        closes: bool,
    },
}

/// What a judged OpenServers item would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenStep {
    /// The server is open already: nothing.
    Open,
    /// Remove hold `index`; `opens` when it is the server's last.
    Remove { index: usize, opens: bool },
}

fn hold_name(name: &str) -> &str {
    if name.is_empty() {
        DEFAULT_HOLD_NAME
    } else {
        name
    }
}

/// The item's failure when its expected version is not `server`'s.
fn check_version(server: &ServerRecord, expected: Option<u64>) -> Result<(), ItemFailure> {
    match expected {
        Some(v) if v != server.state_version => Err(ItemFailure::new(
            FailureCode::StateVersionMismatch,
            format!(
                "ExpectedStateVersion is {v} but the server's StateVersion is {}: its holds changed since it was read; describe it again.",
                server.state_version
            ),
        )),
        _ => Ok(()),
    }
}

/// `text` cut to 64 bytes (at a character boundary), for a listing.
fn short(text: &str) -> String {
    const MAX: usize = 64;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// The holds of `server` but `except`, as a failure reason lists them.
fn remaining_holds(server: &ServerRecord, except: Option<usize>) -> String {
    let mut out = String::new();
    for (i, hold) in server.holds.iter().enumerate() {
        if Some(i) == except {
            continue;
        }
        if !out.is_empty() {
            out.push_str(", ");
        }
        out.push_str(&format!("{:?} (by {}", hold.name, hold.actor));
        if !hold.reason.is_empty() {
            out.push_str(&format!(": {}", short(&hold.reason)));
        }
        out.push(')');
    }
    out
}

impl Fleet {
    /// Closes servers on behalf of `actor`. See `servers.proto` for the
    /// semantics; the result has one entry per item, in order.
    pub async fn close_servers(
        &self,
        items: &[CloseItem],
        actor: &str,
    ) -> Result<Vec<ItemResult>, FleetError> {
        let (results, durable) = self.close_servers_locked(items, actor)?;
        durable.wait().await?;
        Ok(results)
    }

    /// Judges a CloseServers batch exactly as [`Fleet::close_servers`]
    /// would, changes nothing, and says what it would affect, with
    /// capacity counted per value of `tag_key` (none when empty).
    pub fn close_servers_dry_run(
        &self,
        items: &[CloseItem],
        tag_key: &str,
    ) -> Result<(Vec<ItemResult>, BlastRadius), FleetError> {
        let pre = close_precheck(items)?;
        blast::check_tag_key(tag_key)?;
        let now = Instant::now();
        let state = self.read(now);
        let mut judge = self.close_judge(&state, now);
        let unreachable_after = self.config.unreachable_after;
        let mut radius = BlastRadius::default();
        let mut results = Vec::with_capacity(items.len());
        for (item, pre) in items.iter().zip(pre) {
            judge.count_floors_for(&state, item);
            let server = state.servers.get(item.server_id.as_str());
            let step = judge_close(server.map(|s| &**s), item, pre, &mut judge);
            let (Ok(step), Some(server)) = (&step, server) else {
                results.push(step.map(drop));
                continue;
            };
            results.push(Ok(()));
            let before = availability::reasons(server, now, unreachable_after).is_available();
            let after = match step {
                CloseStep::Place { closes: true, .. } => false,
                _ => before,
            };
            radius.servers.push(AffectedServer {
                server_id: item.server_id.clone(),
                available_before: before,
                available_after: after,
                sessions: blast::sessions_on(server),
            });
        }
        state.count_capacity(&mut radius, tag_key, now, unreachable_after);
        Ok((results, radius))
    }

    /// What judging a batch's items carries from one item to the next.
    pub(super) fn close_judge(&self, state: &State, now: Instant) -> CloseJudge<'_> {
        CloseJudge {
            wall: state.hold_expiries.wall(now),
            now,
            floors: &self.config.capacity_floors,
            unreachable_after: self.config.unreachable_after,
            available: None,
        }
    }

    fn close_servers_locked(
        &self,
        items: &[CloseItem],
        actor: &str,
    ) -> Result<(Vec<ItemResult>, persist::Durable), FleetError> {
        let pre = close_precheck(items)?;
        let wall = persist::wall_clock();
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        let mut judge = self.close_judge(&state, now);
        let actor: Arc<str> = Arc::from(actor);
        let mut results = Vec::with_capacity(items.len());
        for (item, pre) in items.iter().zip(pre) {
            judge.count_floors_for(&state, item);
            let version = state.next_state_version();
            let server = state.servers.get_mut(item.server_id.as_str());
            let step = judge_close(server.as_deref().map(|s| &**s), item, pre, &mut judge);
            let (Ok(step), Some(server)) = (step.as_ref(), server) else {
                results.push(step.map(drop));
                continue;
            };
            results.push(Ok(()));
            let CloseStep::Place { expires_at, closes } = *step else {
                continue;
            };
            let name = if item.hold_name.is_empty() {
                holds::default_name()
            } else {
                Arc::from(item.hold_name.as_str())
            };
            // Most servers carry one hold at most: room for exactly one,
            // not the four a first push makes.
            server.holds.reserve_exact(1);
            let expiring = expires_at.map(|at| (at, name.clone()));
            server.holds.push(Hold {
                kind: HoldKind::Closed,
                name,
                actor: actor.clone(),
                since: wall,
                reason: item.reason.clone(),
                expires_at,
                drain: None,
            });
            server.state_version = version;
            let id = server.id.clone();
            if let Some((at, name)) = expiring {
                state.schedule_hold_expiry(at, &id, name);
            }
            state.server_state_changed(&id);
            if closes {
                state.emit_close(&id, item.force, &ctx);
            }
        }
        let durable = self.commit(&mut state);
        Ok((results, durable))
    }

    /// Opens servers. See `servers.proto`; one result per item, in order.
    pub async fn open_servers(&self, items: &[OpenItem]) -> Result<Vec<ItemResult>, FleetError> {
        let (results, durable) = self.open_servers_locked(items)?;
        durable.wait().await?;
        Ok(results)
    }

    /// Judges an OpenServers batch exactly as [`Fleet::open_servers`]
    /// would, changes nothing, and says what it would affect.
    pub fn open_servers_dry_run(
        &self,
        items: &[OpenItem],
        tag_key: &str,
    ) -> Result<(Vec<ItemResult>, BlastRadius), FleetError> {
        validate_batch_size("Servers", items.len())?;
        blast::check_tag_key(tag_key)?;
        let pre = precheck(items.iter().map(|i| i.server_id.as_str()));
        let now = Instant::now();
        let state = self.read(now);
        let unreachable_after = self.config.unreachable_after;
        let mut radius = BlastRadius::default();
        let mut results = Vec::with_capacity(items.len());
        for (item, pre) in items.iter().zip(pre) {
            let server = state.servers.get(item.server_id.as_str()).map(|s| &**s);
            let OpenVerdict { step, result } = judge_open(server, item, pre);
            if let Some(step) = step
                && let Some(server) = server
            {
                let reasons = availability::reasons(server, now, unreachable_after);
                let after = match step {
                    OpenStep::Remove { opens: true, .. } => {
                        reasons.without(Reason::ServerClosed).is_available()
                    }
                    _ => reasons.is_available(),
                };
                radius.servers.push(AffectedServer {
                    server_id: item.server_id.clone(),
                    available_before: reasons.is_available(),
                    available_after: after,
                    sessions: Vec::new(),
                });
            }
            results.push(result);
        }
        state.count_capacity(&mut radius, tag_key, now, unreachable_after);
        Ok((results, radius))
    }

    fn open_servers_locked(
        &self,
        items: &[OpenItem],
    ) -> Result<(Vec<ItemResult>, persist::Durable), FleetError> {
        validate_batch_size("Servers", items.len())?;
        let pre = precheck(items.iter().map(|i| i.server_id.as_str()));
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        let remove_after = self.config.remove_after;
        let mut results = Vec::with_capacity(items.len());
        let mut opened = Vec::new();
        for (item, pre) in items.iter().zip(pre) {
            let version = state.next_state_version();
            let server = state.servers.get_mut(item.server_id.as_str());
            let OpenVerdict { step, result } =
                judge_open(server.as_deref().map(|s| &**s), item, pre);
            results.push(result);
            let (Some(OpenStep::Remove { index, opens }), Some(server)) = (step, server) else {
                continue;
            };
            let removed = if index + 1 == server.holds.len() {
                // The usual case (one hold): no shifting.
                server.holds.pop()
            } else {
                Some(server.holds.remove(index))
            };
            server.state_version = version;
            let deadline = server.last_seen + remove_after;
            let id = server.id.clone();
            if let Some(hold) = removed {
                state.hold_removed(&id, &hold);
            }
            state.server_state_changed(&id);
            if opens {
                state.note_removable(deadline);
                state.emit_open(&id, &ctx);
                opened.push(id);
            }
        }
        // Queued sessions may fit now. Each server checks the queue in a
        // write section of its own: one check is bounded, a batch of them
        // under one hold would not be. With nothing queued (the usual case)
        // there is nothing to check, and no section to take per server.
        if state.sessions.queue.is_empty() {
            opened.clear();
        }
        let durable = self.commit(&mut state);
        drop(state);
        for id in opened {
            let now = Instant::now();
            let mut state = self.write(now);
            state.after_server_change(&id, now, &ctx);
            // As for heartbeats: placements are not acknowledged here.
            drop(self.commit(&mut state));
        }
        Ok((results, durable))
    }

    /// Runs a DescribeServers query, handing each server of the page to
    /// `visit` (under the read lock: `visit` must be quick and must not
    /// call back into the fleet). Returns the next page's token, if any.
    pub fn describe_servers(
        &self,
        query: &DescribeQuery,
        visit: impl FnMut(ServerView<'_>),
    ) -> Result<Option<String>, FleetError> {
        let valid: ValidQuery = query::validate(query).map_err(FleetError::InvalidArgument)?;
        let wall = SystemTime::now();
        // Hashed only when a token is checked or issued: most queries (one
        // page, or a few ids) need neither.
        let fingerprint =
            || query::query_fingerprint("servers", valid.ids.as_deref(), &query.filters);
        let after = self.resume_after(&query.next_token, fingerprint, wall)?;
        let now = Instant::now();
        let state = self.read(now);
        let candidates = query::walk(
            &state.order,
            &state.servers,
            valid.ids.as_deref(),
            after.as_deref(),
        );
        let unreachable_after = self.config.unreachable_after;
        let matching = candidates.filter_map(|record| {
            let reasons = availability::reasons(record, now, unreachable_after);
            valid
                .filters
                .matches(record, reasons)
                .then_some(ServerView { record, reasons })
        });
        let last = query::paginate(matching, valid.page_size, |v| v.record.id.clone(), visit);
        Ok(last.map(|id| self.tokens.issue(&fingerprint(), &id, wall)))
    }

    /// Where a page starts: after the id in `token`, if the token is
    /// genuine, fresh and issued for this query.
    pub(in crate::fleet) fn resume_after(
        &self,
        token: &str,
        fingerprint: impl FnOnce() -> page_token::Fingerprint,
        wall: SystemTime,
    ) -> Result<Option<String>, FleetError> {
        if token.is_empty() {
            return Ok(None);
        }
        self.tokens
            .check(token, &fingerprint(), wall)
            .map(Some)
            .map_err(|e| FleetError::invalid("NextToken", e.to_string()))
    }
}

/// What judging a CloseServers batch carries from item to item.
pub(super) struct CloseJudge<'a> {
    /// The broker's clock now, for expiries.
    wall: SystemTime,
    now: Instant,
    floors: &'a [holds::CapacityFloor],
    unreachable_after: std::time::Duration,
    /// AVAILABLE servers per floor, less what earlier items take. Counted
    /// once, before the first item whose server is in a floored pool: a
    /// walk of the fleet, which only operators who declare floors pay for.
    available: Option<Vec<u32>>,
}

impl CloseJudge<'_> {
    /// Counts the floored pools' AVAILABLE servers if `item`'s server is
    /// the batch's first in one. Before the item's record is borrowed for
    /// the item itself, since the count walks every record.
    /// Inlined: without floors (the usual case) it is one test per item.
    #[inline]
    pub(super) fn count_floors_for(&mut self, state: &State, item: &CloseItem) {
        if self.floors.is_empty() || self.available.is_some() {
            return;
        }
        self.count_floors_at(state, item);
    }

    fn count_floors_at(&mut self, state: &State, item: &CloseItem) {
        if let Some(server) = state.servers.get(item.server_id.as_str())
            && self.floors.iter().any(|f| f.covers(server))
        {
            self.available =
                Some(state.available_per_floor(self.floors, self.now, self.unreachable_after));
        }
    }
}

/// Judges one CloseServers item against `state`, after the batch's
/// earlier items (whose servers are others: ids are unique in a batch).
/// The real call applies each item as soon as it is judged, while its
/// record is in the cache; a dry run only judges: both judge alike.
/// Inlined: it runs once per item of batches of up to 1,000.
#[inline]
pub(super) fn judge_close(
    server: Option<&ServerRecord>,
    item: &CloseItem,
    pre: Option<ItemFailure>,
    j: &mut CloseJudge<'_>,
) -> Result<CloseStep, ItemFailure> {
    if let Some(failure) = pre {
        return Err(failure);
    }
    let expires_at = match item.expiry {
        Expiry::Never => None,
        ref expiry => expiry
            .resolve(j.wall)
            .map_err(|why| ItemFailure::new(FailureCode::InvalidHold, why))?,
    };
    let server = server.ok_or_else(ItemFailure::not_found)?;
    check_version(server, item.expected_version)?;
    if server
        .holds
        .iter()
        .any(|h| holds::is_named(h, &item.hold_name))
    {
        return Ok(CloseStep::Held);
    }
    if server.holds.len() >= holds::MAX_HOLDS_PER_SERVER {
        return Err(ItemFailure::new(
            FailureCode::InvalidHold,
            format!(
                "The server has {} holds already, the most it may have; open one first.",
                server.holds.len()
            ),
        ));
    }
    if server.is_closed() {
        return Ok(CloseStep::Place {
            expires_at,
            closes: false,
        });
    }
    // Placements in flight count: a close never races a placement.
    let running = server.live_sessions().count();
    if running > 0 && !item.force {
        return Err(ItemFailure::new(
            FailureCode::HasRunningSessions,
            format!(
                "Dcv server has {running} running session(s); set Force to close it anyway (the sessions keep running)."
            ),
        ));
    }
    if let Some(counts) = j.available.as_mut()
        && j.floors.iter().any(|f| f.covers(server))
        && availability::reasons(server, j.now, j.unreachable_after).is_available()
    {
        let floors = j.floors;
        if !item.override_floor
            && let Some((floor, count)) = floors
                .iter()
                .zip(counts.iter())
                .find(|(f, n)| f.covers(server) && **n <= f.min_available)
        {
            return Err(ItemFailure::new(
                FailureCode::CapacityFloor,
                format!(
                    "Closing it would leave pool {} with {} AVAILABLE server(s), below its floor of {}; set OverrideCapacityFloor to close it anyway.",
                    floor.pool(),
                    count.saturating_sub(1),
                    floor.min_available
                ),
            ));
        }
        for (floor, count) in floors.iter().zip(counts.iter_mut()) {
            if floor.covers(server) {
                *count = count.saturating_sub(1);
            }
        }
    }
    Ok(CloseStep::Place {
        expires_at,
        closes: true,
    })
}

/// The checks of a CloseServers batch that need no lock: its size, and
/// each item's id, reason and hold name.
fn close_precheck(items: &[CloseItem]) -> Result<Vec<Option<ItemFailure>>, FleetError> {
    validate_batch_size("Servers", items.len())?;
    let mut pre = precheck(items.iter().map(|i| i.server_id.as_str()));
    for (item, slot) in items.iter().zip(pre.iter_mut()) {
        if slot.is_some() {
            continue;
        }
        if let Err(why) = validate_reason(&item.reason) {
            *slot = Some(ItemFailure::new(FailureCode::InvalidReason, why));
        } else if !item.hold_name.is_empty()
            && let Err(why) = holds::validate_hold_name(&item.hold_name)
        {
            *slot = Some(ItemFailure::new(FailureCode::InvalidHold, why));
        } else if let Expiry::Malformed(why) = &item.expiry {
            *slot = Some(ItemFailure::new(FailureCode::InvalidHold, why.clone()));
        }
    }
    Ok(pre)
}

/// A judged OpenServers item: what it does and what it reports. A
/// removed hold that leaves others has both a step and a failure.
struct OpenVerdict {
    /// What to change, if anything.
    step: Option<OpenStep>,
    /// The item's result.
    result: ItemResult,
}

impl OpenVerdict {
    fn ok(step: OpenStep) -> Self {
        OpenVerdict {
            step: Some(step),
            result: Ok(()),
        }
    }

    fn failed(failure: ItemFailure) -> Self {
        OpenVerdict {
            step: None,
            result: Err(failure),
        }
    }
}

/// Judges one OpenServers item against `server` (its record, if known).
#[inline]
fn judge_open(
    server: Option<&ServerRecord>,
    item: &OpenItem,
    pre: Option<ItemFailure>,
) -> OpenVerdict {
    if let Some(failure) = pre {
        return OpenVerdict::failed(failure);
    }
    if !item.hold_name.is_empty()
        && let Err(why) = holds::validate_hold_name(&item.hold_name)
    {
        return OpenVerdict::failed(ItemFailure::new(FailureCode::InvalidHold, why));
    }
    let Some(server) = server else {
        return OpenVerdict::failed(ItemFailure::not_found());
    };
    if let Err(failure) = check_version(server, item.expected_version) {
        return OpenVerdict::failed(failure);
    }
    if !server.is_closed() {
        return OpenVerdict::ok(OpenStep::Open);
    }
    let index = server
        .holds
        .iter()
        .position(|h| holds::is_named(h, &item.hold_name));
    let left = server.holds.len() - usize::from(index.is_some());
    if left == 0
        && let Some(index) = index
    {
        return OpenVerdict::ok(OpenStep::Remove { index, opens: true });
    }
    let name = hold_name(&item.hold_name);
    let what = match index {
        Some(_) => format!("Hold {name:?} removed, but"),
        None => format!("The server has no hold named {name:?};"),
    };
    OpenVerdict {
        step: index.map(|index| OpenStep::Remove {
            index,
            opens: false,
        }),
        result: Err(ItemFailure::new(
            FailureCode::HoldsRemain,
            format!(
                "{what} the server stays closed: {left} other hold(s) remain: {}.",
                remaining_holds(server, index)
            ),
        )),
    }
}
