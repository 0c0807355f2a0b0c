//! What a dry run reports: the servers and sessions a call would affect,
//! and AVAILABLE capacity per pool before and after it.

use std::collections::BTreeMap;

use tokio::time::Instant;

use super::{
    availability,
    error::FleetError,
    model::{ServerRecord, SessionKind},
    state::State,
    validate::MAX_TEXT_BYTES,
};

/// A session a call would affect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffectedSession {
    /// Its id.
    pub id: String,
    /// Its owner.
    pub owner: String,
    /// Console or virtual.
    pub kind: SessionKind,
}

/// A server a call would act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AffectedServer {
    /// Its id.
    pub server_id: String,
    /// Whether it is AVAILABLE now.
    pub available_before: bool,
    /// Whether it would be after the call.
    pub available_after: bool,
    /// The sessions affected on it.
    pub sessions: Vec<AffectedSession>,
}

/// AVAILABLE servers of a pool before and after a call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolCapacity {
    /// The tag key (empty: the whole fleet).
    pub key: String,
    /// The tag value (empty: the whole fleet, or servers without the tag).
    pub value: String,
    /// AVAILABLE now.
    pub before: u32,
    /// AVAILABLE after the call.
    pub after: u32,
}

/// What a dry run reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BlastRadius {
    /// The servers acted on, in request order.
    pub servers: Vec<AffectedServer>,
    /// Per value of the requested tag key, ascending.
    pub pools: Vec<PoolCapacity>,
    /// The whole fleet.
    pub overall: PoolCapacity,
}

/// Checks a request's CapacityTagKey: no tag key is longer than
/// [`MAX_TEXT_BYTES`], so a longer one is a mistake, and it is compared
/// with every server's tags.
pub(in crate::fleet) fn check_tag_key(key: &str) -> Result<(), FleetError> {
    if key.len() > MAX_TEXT_BYTES {
        return Err(FleetError::invalid(
            "CapacityTagKey",
            format!("must be at most {MAX_TEXT_BYTES} bytes; got {}", key.len()),
        ));
    }
    Ok(())
}

/// The sessions running on `server`, as a dry run lists them.
pub(in crate::fleet) fn sessions_on(server: &ServerRecord) -> Vec<AffectedSession> {
    server
        .live_sessions()
        .map(|s| AffectedSession {
            id: s.id.to_owned(),
            owner: s.owner.to_owned(),
            kind: s.kind,
        })
        .collect()
}

impl State {
    /// Fills `radius.pools` and `radius.overall` from the fleet now and the
    /// availability changes `radius.servers` says. A walk of the fleet:
    /// dry runs only.
    pub(in crate::fleet) fn count_capacity(
        &self,
        radius: &mut BlastRadius,
        tag_key: &str,
        now: Instant,
        unreachable_after: std::time::Duration,
    ) {
        let mut pools: BTreeMap<String, (u32, u32)> = BTreeMap::new();
        let mut overall = 0u32;
        for server in self.servers.values() {
            let available = availability::reasons(server, now, unreachable_after).is_available();
            if !tag_key.is_empty() {
                let value = server
                    .tag(tag_key)
                    .map(|v| v.into_owned())
                    .unwrap_or_default();
                let entry = pools.entry(value).or_default();
                entry.0 += u32::from(available);
            }
            overall += u32::from(available);
        }
        for entry in pools.values_mut() {
            entry.1 = entry.0;
        }
        let mut after = overall;
        for affected in &radius.servers {
            let delta = i64::from(affected.available_after) - i64::from(affected.available_before);
            if delta == 0 {
                continue;
            }
            after = after.saturating_add_signed(delta as i32);
            if !tag_key.is_empty()
                && let Some(server) = self.servers.get(affected.server_id.as_str())
            {
                let value = server
                    .tag(tag_key)
                    .map(|v| v.into_owned())
                    .unwrap_or_default();
                let entry = pools.entry(value).or_default();
                entry.1 = entry.1.saturating_add_signed(delta as i32);
            }
        }
        radius.overall = PoolCapacity {
            before: overall,
            after,
            ..Default::default()
        };
        radius.pools = pools
            .into_iter()
            .map(|(value, (before, after))| PoolCapacity {
                key: tag_key.to_owned(),
                value,
                before,
                after,
            })
            .collect();
    }
}
