//! The drains' index in the fleet's state: each drain's servers and the
//! deadlines to act on (see `drains.rs`, which keeps and reads it).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::SystemTime,
};

use super::model::{DrainSpec, ServerId};

/// The servers given a drain's hold.
pub(in crate::fleet) type DrainMembers = BTreeSet<ServerId>;

/// Drains by id, and their deadlines.
#[derive(Debug, Default)]
pub(in crate::fleet) struct DrainIndex {
    /// Each drain's servers: those given its hold (a few may have lost it
    /// since; readers check).
    pub(in crate::fleet) members: BTreeMap<Arc<str>, DrainMembers>,
    /// The deadlines still to act on, earliest first.
    pub(in crate::fleet) deadlines: BTreeSet<(SystemTime, Arc<str>)>,
}

impl DrainIndex {
    pub(in crate::fleet) fn join(&mut self, spec: &DrainSpec, server: &ServerId) {
        let deadlines = &mut self.deadlines;
        self.members
            .entry(spec.id.clone())
            .or_insert_with(|| {
                if let Some(at) = spec.deadline {
                    deadlines.insert((at, spec.id.clone()));
                }
                BTreeSet::new()
            })
            .insert(server.clone());
    }

    pub(in crate::fleet) fn leave(&mut self, drain: &str, server: &str) {
        if let Some(members) = self.members.get_mut(drain) {
            members.remove(server);
            if members.is_empty() {
                // Its deadline entry stays, and is skipped when due.
                self.members.remove(drain);
            }
        }
    }
}
