//! The state's side of holds: versions that change with them, the timed
//! end of expiring holds (processed by the first operation at or after
//! the expiry, and by the periodic sweep), and the AVAILABLE counts that
//! capacity floors are judged against.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{
    availability,
    holds::CapacityFloor,
    model::{Hold, ServerId},
    persist::AuditItem,
    state::{Ctx, State},
};

impl State {
    /// A fresh state version: greater than every version this state has
    /// seen, so a version never repeats while its server is known.
    pub(in crate::fleet) fn next_state_version(&mut self) -> u64 {
        self.last_state_version += 1;
        self.last_state_version
    }

    /// Notes that `id`'s holds changed: a new version, and the store told.
    pub(in crate::fleet) fn holds_changed(&mut self, id: &ServerId) {
        let version = self.next_state_version();
        if let Some(server) = self.servers.get_mut(id.as_ref()) {
            server.state_version = version;
        }
        self.server_state_changed(id);
    }

    /// Makes sure every expiring hold of `holds` (server `id`'s) ends on
    /// time. Entries already there are not added twice.
    pub(in crate::fleet) fn schedule_hold_expiries(&mut self, id: &str, holds: &[Hold]) {
        let mut server: Option<ServerId> = None;
        for hold in holds {
            if let Some(at) = hold.expires_at {
                let server = server.get_or_insert_with(|| Arc::from(id)).clone();
                self.hold_expiries
                    .due
                    .insert((at, server, hold.name.clone()));
            }
        }
    }

    /// Makes sure hold `name` of server `id` ends at `at`.
    pub(in crate::fleet) fn schedule_hold_expiry(
        &mut self,
        at: SystemTime,
        id: &ServerId,
        name: Arc<str>,
    ) {
        self.hold_expiries.due.insert((at, id.clone(), name));
    }

    /// Whether an expiry is due at `now`.
    pub(in crate::fleet) fn hold_expiry_due(&self, now: Instant) -> bool {
        self.hold_expiries
            .due
            .first()
            .is_some_and(|(at, _, _)| *at <= self.hold_expiries.wall(now))
    }

    /// Ends every hold due at `now`; servers left without a hold are open
    /// again. Each end is recorded for the audit log.
    pub(in crate::fleet) fn expire_holds(&mut self, now: Instant, ctx: &Ctx<'_>) {
        let wall = self.hold_expiries.wall(now);
        let mut reopened = Vec::new();
        while let Some((at, _, _)) = self.hold_expiries.due.first()
            && *at <= wall
        {
            let Some((at, id, name)) = self.hold_expiries.due.pop_first() else {
                break;
            };
            let Some(server) = self.servers.get_mut(id.as_ref()) else {
                continue;
            };
            let Some(i) = server
                .holds
                .iter()
                .position(|h| h.name == name && h.expires_at == Some(at))
            else {
                continue;
            };
            let hold = server.holds.remove(i);
            let open = !server.is_closed();
            let deadline = server.last_seen + ctx.config.remove_after;
            let id = server.id.clone();
            self.holds_changed(&id);
            tracing::info!(server = %id, hold = %hold.name, actor = %hold.actor, "hold expired");
            self.audit_own_act(wall, "HoldExpired", || {
                let outcome = if open { "OK" } else { "HOLDS_REMAIN" };
                vec![AuditItem::new(
                    &id,
                    outcome.to_owned(),
                    format!(
                        "hold {:?} placed by {} expired{}",
                        hold.name,
                        hold.actor,
                        if hold.reason.is_empty() {
                            String::new()
                        } else {
                            format!(" (reason: {})", hold.reason)
                        }
                    ),
                )]
            });
            if open {
                self.note_removable(deadline);
                self.emit_open(&id, ctx);
                reopened.push(id);
            }
        }
        if !self.sessions.queue.is_empty() {
            for id in reopened {
                self.after_server_change(&id, now, ctx);
            }
        }
    }

    /// AVAILABLE servers now, per floor of `floors` (same order).
    pub(in crate::fleet) fn available_per_floor(
        &self,
        floors: &[CapacityFloor],
        now: Instant,
        unreachable_after: Duration,
    ) -> Vec<u32> {
        let mut counts = vec![0u32; floors.len()];
        for server in self.servers.values() {
            let mut covered = floors.iter().enumerate().filter(|(_, f)| f.covers(server));
            let Some(first) = covered.next() else {
                continue;
            };
            if !availability::reasons(server, now, unreachable_after).is_available() {
                continue;
            }
            counts[first.0] += 1;
            for (i, _) in covered {
                counts[i] += 1;
            }
        }
        counts
    }
}
