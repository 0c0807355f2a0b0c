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

use super::{Order, SessionId};
use crate::fleet::{model::FastMap, requirements::Requirements};

/// The most Requirements evaluation work one check of the queue against
/// one server may do, in [`Requirements::cost`] units (distinct
/// expressions counted once): about a third of a millisecond of one core.
/// Room for a thousand distinct one-tag expressions, or seven of the
/// longest; identical ones are free.
pub const MAX_QUEUE_REQUIREMENTS_COST: u64 = 64 * 1024;

/// One queued session.
#[derive(Debug, Clone)]
pub(in crate::fleet) struct Entry {
    pub(in crate::fleet) id: SessionId,
    pub(in crate::fleet) order: Arc<Order>,
    /// The id of its Requirements' group; `None` without Requirements.
    pub(in crate::fleet) group: Option<u64>,
    /// Its queue position (entries are in position order).
    position: u64,
}

/// The queued sessions that share one expression.
#[derive(Debug)]
struct Group {
    id: u64,
    members: usize,
    cost: u64,
}

/// Queued sessions, oldest first, and the distinct Requirements among
/// them.
#[derive(Debug, Default)]
pub(in crate::fleet) struct Queue {
    /// With each its order and its expression's group, so that checking
    /// the queue looks nothing up and compares no text.
    entries: Vec<Entry>,
    /// Each distinct expression (canonical text): its group.
    groups: FastMap<Arc<str>, Group>,
    /// The next group's id.
    next_group: u64,
    /// The sum of the groups' costs.
    cost: u64,
}

impl Queue {
    pub(in crate::fleet) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(in crate::fleet) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(in crate::fleet) fn get(&self, i: usize) -> Option<&Entry> {
        self.entries.get(i)
    }

    /// Whether a session with `requirements` may join without the
    /// queue's Requirements cost passing its bound.
    pub(in crate::fleet) fn admits(&self, requirements: Option<&Requirements>) -> bool {
        match requirements {
            None => true,
            Some(r) => {
                self.groups.contains_key(r.canonical())
                    || self.cost.saturating_add(r.cost()) <= MAX_QUEUE_REQUIREMENTS_COST
            }
        }
    }

    /// Adds `id` at the back; `position` is past every queued one's.
    pub(in crate::fleet) fn push(&mut self, id: SessionId, order: Arc<Order>, position: u64) {
        let group = self.join(&order);
        self.entries.push(Entry {
            id,
            order,
            group,
            position,
        });
    }

    /// Adds `id` where `position` puts it (a replica applying the
    /// leader's queue, whose changes may arrive in any order).
    pub(in crate::fleet) fn insert(&mut self, id: SessionId, order: Arc<Order>, position: u64) {
        let group = self.join(&order);
        let at = self.entries.partition_point(|e| e.position <= position);
        self.entries.insert(
            at,
            Entry {
                id,
                order,
                group,
                position,
            },
        );
    }

    /// Counts a new member of `order`'s Requirements group; its id.
    fn join(&mut self, order: &Order) -> Option<u64> {
        order.requirements.as_ref().map(|r| {
            let next = &mut self.next_group;
            let group = self.groups.entry(r.canonical().clone()).or_insert_with(|| {
                *next += 1;
                Group {
                    id: *next,
                    members: 0,
                    cost: r.cost(),
                }
            });
            if group.members == 0 {
                self.cost += group.cost;
            }
            group.members += 1;
            group.id
        })
    }

    /// Takes out the session at `i`.
    pub(in crate::fleet) fn remove_at(&mut self, i: usize) {
        if i < self.entries.len() {
            let entry = self.entries.remove(i);
            self.left(entry.order.requirements.as_ref());
        }
    }

    /// Takes out `id`, if it is queued.
    pub(in crate::fleet) fn remove(&mut self, id: &SessionId) {
        if let Some(i) = self.entries.iter().position(|e| e.id == *id) {
            self.remove_at(i);
        }
    }

    fn left(&mut self, requirements: Option<&Requirements>) {
        let Some(r) = requirements else {
            return;
        };
        if let Some(group) = self.groups.get_mut(r.canonical()) {
            group.members = group.members.saturating_sub(1);
            if group.members == 0 {
                self.cost = self.cost.saturating_sub(group.cost);
                self.groups.remove(r.canonical());
            }
        }
    }
}
