//! The queue of CreateSessions requests waiting for a server, with what
//! bounds the work it causes under the fleet's lock.
//!
//! Every time a server gains room, the queue is checked against it, oldest
//! first, under the write lock. The cheap checks (availability, type,
//! room, the per-user limit) cost little per request; Requirements cost up
//! to a few thousand steps each. Two things bound them: identical
//! expressions are evaluated once per check however many requests carry
//! them (see `State::drain_queue_onto`), and the queue admits a request
//! with a new expression only while the distinct expressions it holds
//! cost at most [`MAX_QUEUE_REQUIREMENTS_COST`] together. One check of
//! the whole queue is thus bounded regardless of what was queued.

use std::sync::Arc;

use super::{FastMap, requirements::Requirements, sessions::SessionId};

/// The most Requirements evaluation work one check of the queue against
/// one server may do, in [`Requirements::cost`] units (distinct
/// expressions counted once): about a third of a millisecond of one core.
/// Room for a thousand distinct one-tag expressions, or seven of the
/// longest; identical ones are free.
pub const MAX_QUEUE_REQUIREMENTS_COST: u64 = 64 * 1024;

/// Queued sessions, oldest first, and the distinct Requirements among
/// them.
#[derive(Debug, Default)]
pub(super) struct Queue {
    ids: Vec<SessionId>,
    /// Each distinct expression (canonical text): how many queued
    /// sessions carry it, and its cost.
    groups: FastMap<Arc<str>, (usize, u64)>,
    /// The sum of the groups' costs.
    cost: u64,
}

impl Queue {
    pub(super) fn len(&self) -> usize {
        self.ids.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub(super) fn get(&self, i: usize) -> Option<&SessionId> {
        self.ids.get(i)
    }

    /// Whether a session with `requirements` may join without the
    /// queue's Requirements cost passing its bound.
    pub(super) fn admits(&self, requirements: Option<&Requirements>) -> bool {
        match requirements {
            None => true,
            Some(r) => {
                self.groups.contains_key(r.canonical())
                    || self.cost.saturating_add(r.cost()) <= MAX_QUEUE_REQUIREMENTS_COST
            }
        }
    }

    /// Adds `id` at the back.
    pub(super) fn push(&mut self, id: SessionId, requirements: Option<&Requirements>) {
        self.ids.push(id);
        if let Some(r) = requirements {
            let group = self
                .groups
                .entry(r.canonical().clone())
                .or_insert((0, r.cost()));
            if group.0 == 0 {
                self.cost += group.1;
            }
            group.0 += 1;
        }
    }

    /// Takes out the session at `i`.
    pub(super) fn remove_at(&mut self, i: usize, requirements: Option<&Requirements>) {
        if i < self.ids.len() {
            self.ids.remove(i);
            self.left(requirements);
        }
    }

    /// Takes out `id`, if it is queued.
    pub(super) fn remove(&mut self, id: &SessionId, requirements: Option<&Requirements>) {
        if let Some(i) = self.ids.iter().position(|q| q == id) {
            self.remove_at(i, requirements);
        }
    }

    fn left(&mut self, requirements: Option<&Requirements>) {
        let Some(r) = requirements else {
            return;
        };
        if let Some(group) = self.groups.get_mut(r.canonical()) {
            group.0 = group.0.saturating_sub(1);
            if group.0 == 0 {
                self.cost = self.cost.saturating_sub(group.1);
                self.groups.remove(r.canonical());
            }
        }
    }
}
