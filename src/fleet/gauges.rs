//! What the fleet looks like right now, in numbers, for the metrics scrape:
//! one read section over the servers and sessions, and the placement
//! counters the write sections keep.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{
    availability::{self, Reason},
    handle::Fleet,
    model::{SessionState, Substate},
    state::PlacementCounts,
};

/// The fleet's gauges at one instant.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FleetGauges {
    /// Servers that can take a new session.
    pub available: u64,
    /// Servers that cannot, by each reason that applies (a server counts
    /// under every reason it has), in [`Reason::ALL`]'s order.
    pub unavailable: [u64; Reason::ALL.len()],
    /// Servers with at least one hold.
    pub closed: u64,
    /// Holds on all servers.
    pub holds: u64,
    /// Sessions by state: CREATING, READY, DELETING, DELETED, UNKNOWN.
    pub sessions: [u64; 5],
    /// Sessions waiting in the queue.
    pub queued: u64,
    /// How long the oldest queued request has waited (zero: none).
    pub oldest_queued: Duration,
    /// Agents with an open instruction stream.
    pub agents_connected: u64,
    /// Instructions sent to agents and not yet answered: creations on a
    /// server and deletions.
    pub instructions_in_flight: u64,
    /// Placements since start.
    pub placements: PlacementCounts,
}

/// The names of [`FleetGauges::sessions`]' states, in order.
pub const SESSION_STATES: [&str; 5] = ["CREATING", "READY", "DELETING", "DELETED", "UNKNOWN"];

impl Fleet {
    /// The fleet's gauges now. One read section whose work is linear in
    /// the servers and sessions the broker already holds (bounded by the
    /// fleet, not by any request): a scrape every few seconds.
    pub fn gauges(&self) -> FleetGauges {
        let now = Instant::now();
        let wall = SystemTime::now();
        let unreachable_after = self.config.unreachable_after;
        let state = self.state.read();
        let mut out = FleetGauges {
            placements: state.sessions.placements,
            agents_connected: state.sessions.agents.len() as u64,
            queued: state.sessions.queue.len() as u64,
            ..FleetGauges::default()
        };
        for server in state.servers.values() {
            let reasons = availability::reasons(server, now, unreachable_after);
            if reasons.is_available() {
                out.available += 1;
            }
            for reason in reasons.iter() {
                out.unavailable[reason as usize] += 1;
            }
            if !server.holds.is_empty() {
                out.closed += 1;
            }
            out.holds += server.holds.len() as u64;
        }
        for record in state.sessions.records.values() {
            let i = match record.state {
                SessionState::Creating => 0,
                SessionState::Ready => 1,
                SessionState::Deleting => 2,
                SessionState::Deleted => 3,
                SessionState::Unknown => 4,
            };
            out.sessions[i] += 1;
            let awaiting_agent = match record.state {
                SessionState::Creating => {
                    record.server.is_some() && record.substate == Some(Substate::Placing)
                }
                SessionState::Deleting => record.server.is_some(),
                _ => false,
            };
            out.instructions_in_flight += u64::from(awaiting_agent);
        }
        if let Some(entry) = state.sessions.queue.get(0)
            && let Some(record) = state.sessions.records.get(&entry.id)
        {
            out.oldest_queued = wall.duration_since(record.created_at).unwrap_or_default();
        }
        out
    }
}
