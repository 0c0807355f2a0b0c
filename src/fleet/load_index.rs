//! The fleet's servers ordered by load, so that placement does not scan
//! the fleet.
//!
//! A server's load is the number of sessions occupying it (reported ones
//! not yet deleted, plus placements in flight: [`ServerRecord::live_sessions`]).
//! Spread wants the least loaded server that can take an order, Pack the
//! most loaded one; both break ties by the lowest id. Scanning every server
//! for that under the fleet's write lock made each CreateSessions cost
//! O(fleet) and stalled every other request behind it. The index holds one
//! `(load, id)` entry per server, and placement walks it in the strategy's
//! order, stopping at the first server that can take the order: in a fleet
//! with room, one of the first few. Servers that cannot take it (closed,
//! unreachable, unhealthy, full, the wrong OS) are still walked past, so
//! the worst case stays O(fleet) when most of the fleet cannot.
//!
//! The index is only right if it moves with every change of a server's
//! sessions, placements or presence. The fleet's state adds and removes
//! servers only through `State::insert_server` and `State::take_server`,
//! and changes a server's sessions or placements only inside
//! [`LoadIndex::update`], which moves the server as its load changes. In
//! debug builds an entry that is not where its record says it should be
//! fails an assertion the next time the server's load changes or placement
//! walks past it.

use std::collections::BTreeSet;

use super::model::{ServerId, ServerRecord};

/// The load of `server` as the index orders it.
pub(super) fn load_of(server: &ServerRecord) -> u32 {
    // Saturates rather than wraps: a server cannot hold anywhere near
    // u32::MAX sessions (heartbeats report at most MAX_REPORTED_SESSIONS).
    u32::try_from(server.live_sessions().count()).unwrap_or(u32::MAX)
}

/// One entry per server: its load and its id.
pub(super) type Entry = (u32, ServerId);

/// Servers ordered by (load, id).
#[derive(Debug)]
pub(super) struct LoadIndex {
    entries: BTreeSet<Entry>,
    /// Sorts before every real id (ids are never empty), so `(load, floor)`
    /// is where the servers of one load start.
    floor: ServerId,
}

impl Default for LoadIndex {
    fn default() -> Self {
        LoadIndex {
            entries: BTreeSet::new(),
            floor: ServerId::from(""),
        }
    }
}

impl LoadIndex {
    /// Adds a server that is not in the index yet.
    pub(super) fn insert(&mut self, load: u32, id: ServerId) {
        let fresh = self.entries.insert((load, id));
        debug_assert!(fresh, "a server entered the load index twice");
    }

    /// Removes a server the index holds at `load`.
    pub(super) fn remove(&mut self, load: u32, id: &ServerId) {
        let found = self.entries.remove(&(load, id.clone()));
        debug_assert!(found, "server {id} is not in the load index at load {load}");
    }

    /// Runs `change` on `server`, an indexed server whose sessions or
    /// placements it may change, and moves the server to its new load.
    /// Every change to a server's `sessions` or `placing` goes through
    /// here, so the index cannot fall behind the records.
    pub(super) fn update<R>(
        &mut self,
        server: &mut ServerRecord,
        change: impl FnOnce(&mut ServerRecord) -> R,
    ) -> R {
        let before = load_of(server);
        let out = change(server);
        self.moved(&server.id, before, load_of(server));
        out
    }

    /// Moves a server whose load changed from `from` to `to`.
    fn moved(&mut self, id: &ServerId, from: u32, to: u32) {
        if from != to {
            self.remove(from, id);
            self.insert(to, id.clone());
        }
    }

    /// Spread's order: least loaded first, ties by ascending id.
    pub(super) fn least_loaded_first(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// Pack's order: most loaded first, ties by ascending id (not the
    /// reverse of Spread's order, which would break ties by descending id).
    pub(super) fn most_loaded_first(&self) -> impl Iterator<Item = &Entry> {
        let mut next_load = self.entries.last().map(|(load, _)| *load);
        std::iter::from_fn(move || {
            let load = next_load?;
            let start = (load, self.floor.clone());
            next_load = self.entries.range(..&start).next_back().map(|(l, _)| *l);
            Some(
                self.entries
                    .range(&start..)
                    .take_while(move |(l, _)| *l == load),
            )
        })
        .flatten()
    }

    /// Every entry, in (load, id) order.
    #[cfg(test)]
    pub(super) fn entries(&self) -> &BTreeSet<Entry> {
        &self.entries
    }
}

#[cfg(test)]
mod tests;
