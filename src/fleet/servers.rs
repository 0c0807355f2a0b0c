//! Operators' server operations: close, open, describe.

use std::{sync::Arc, time::SystemTime};

use tokio::time::Instant;

use super::{
    availability::{self, Reasons},
    error::{FailureCode, FleetError, ItemFailure, ItemResult},
    handle::Fleet,
    model::{Hold, HoldKind, ServerRecord},
    page_token, persist,
    query::{self, DescribeQuery, ValidQuery},
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
}

/// A server as DescribeServers sees it: the record and its availability.
#[derive(Debug, Clone, Copy)]
pub struct ServerView<'a> {
    /// The record.
    pub record: &'a ServerRecord,
    /// Why it is unavailable, if it is.
    pub reasons: Reasons,
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

    fn close_servers_locked(
        &self,
        items: &[CloseItem],
        actor: &str,
    ) -> Result<(Vec<ItemResult>, persist::Durable), FleetError> {
        validate_batch_size("Servers", items.len())?;
        let mut pre = precheck(items.iter().map(|i| i.server_id.as_str()));
        for (item, slot) in items.iter().zip(pre.iter_mut()) {
            if slot.is_none()
                && let Err(why) = validate_reason(&item.reason)
            {
                *slot = Some(ItemFailure::new(FailureCode::InvalidReason, why));
            }
        }
        let wall = persist::wall_clock();
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        let mut results = Vec::with_capacity(items.len());
        let actor: Arc<str> = Arc::from(actor);
        for (item, pre) in items.iter().zip(pre) {
            if let Some(failure) = pre {
                results.push(Err(failure));
                continue;
            }
            let Some(server) = state.servers.get_mut(item.server_id.as_str()) else {
                results.push(Err(ItemFailure::not_found()));
                continue;
            };
            if server.is_closed() {
                results.push(Ok(()));
                continue;
            }
            // Placements in flight count: a close never races a placement.
            let running = server.live_sessions().count();
            if running > 0 && !item.force {
                results.push(Err(ItemFailure::new(
                    FailureCode::HasRunningSessions,
                    format!(
                        "Dcv server has {running} running session(s); set Force to close it anyway (the sessions keep running)."
                    ),
                )));
                continue;
            }
            server.holds.push(Hold {
                kind: HoldKind::Closed,
                actor: actor.clone(),
                since: wall,
                reason: item.reason.clone(),
            });
            let id = server.id.clone();
            state.server_state_changed(&id);
            state.emit_close(&id, item.force, &ctx);
            results.push(Ok(()));
        }
        let durable = self.commit(&mut state);
        Ok((results, durable))
    }

    /// Opens servers. See `servers.proto`; one result per item, in order.
    pub async fn open_servers(&self, server_ids: &[String]) -> Result<Vec<ItemResult>, FleetError> {
        let (results, durable) = self.open_servers_locked(server_ids)?;
        durable.wait().await?;
        Ok(results)
    }

    fn open_servers_locked(
        &self,
        server_ids: &[String],
    ) -> Result<(Vec<ItemResult>, persist::Durable), FleetError> {
        validate_batch_size("Servers", server_ids.len())?;
        let pre = precheck(server_ids.iter().map(String::as_str));
        let now = Instant::now();
        let ctx = self.ctx();
        let mut state = self.write(now);
        let remove_after = self.config.remove_after;
        let mut results = Vec::with_capacity(server_ids.len());
        let mut opened = Vec::new();
        for (id, pre) in server_ids.iter().zip(pre) {
            if let Some(failure) = pre {
                results.push(Err(failure));
                continue;
            }
            let Some(server) = state.servers.get_mut(id.as_str()) else {
                results.push(Err(ItemFailure::not_found()));
                continue;
            };
            if !server.is_closed() {
                results.push(Ok(()));
                continue;
            }
            server.holds.retain(|h| h.kind != HoldKind::Closed);
            let deadline = server.last_seen + remove_after;
            let id = server.id.clone();
            state.server_state_changed(&id);
            state.note_removable(deadline);
            state.emit_open(&id, &ctx);
            opened.push(id);
            results.push(Ok(()));
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
