//! Model-based property test of named holds, state versions, capacity
//! floors and dry runs (issue 18) against a naive reference model.
//!
//! Proptest generates random sequences of operations on a fleet of six
//! servers tagged with a `pool` (gpu, cpu or none) and a `zone` (z1, z2),
//! under three capacity floors (`pool=gpu:2`, `pool=cpu:1`, `zone=z1:2`, so
//! that a server can sit under two floors at once): agents registering
//! (perhaps into another pool), heartbeating (healthy or not, with sessions
//! that make a server busy or full) and deregistering; operators closing
//! with random hold names (the default one, named ones, a malformed one),
//! expiries, expected state versions (the one just read, a stale one, or
//! none), Force and OverrideCapacityFloor, and opening with random names and
//! versions; piles of up to 18 holds on one server (16 is the most); empty
//! and oversized batches; dry runs of both; and tokio's paused clock moving
//! on, which ends expiring holds (exactly at their expiry) and makes silent
//! agents unreachable.
//!
//! The model is a map from id to the server's holds in order of placement
//! (name, actor, reason, expiry), its pool and zone, live sessions, health,
//! last heartbeat and departure; it judges every item the naive way (floors
//! counted afresh from the model for each item, earlier items included).
//! After every operation the test checks that:
//! - each item's result is the model's (compared by FailureCode);
//! - DescribeServers shows the model's servers: holds (name, actor, reason,
//!   whether it expires), closed, AVAILABLE, pool and zone;
//! - every server's StateVersion strictly increased if the model says its
//!   holds changed during the operation (an expiry included), and is
//!   unchanged otherwise;
//! - a dry run's items are what the model predicts the real call would
//!   give, its blast radius counts the model's capacity before and after
//!   per pool and overall, and DescribeServers is identical before and
//!   after it;
//! - for every floor, a close batch without OverrideCapacityFloor never
//!   leaves the pool with fewer AVAILABLE servers than both its floor and
//!   what it had before (servers may still become unavailable by silence).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, SystemTime},
};

use dcv_broker::{
    fleet::{
        BlastRadius, CapacityFloor, CloseItem, DEFAULT_HOLD_NAME, DescribeQuery, Expiry,
        FailureCode, Fleet, FleetConfig, FleetError, Heartbeat, ItemResult, MAX_BATCH_ITEMS,
        OpenItem, ReportedSession, ServerDescription, ServerView, SessionKind, SessionState, Tag,
        holds::{MAX_HOLD_DURATION, MAX_HOLDS_PER_SERVER},
        model::MAX_REASON_CHARS,
    },
    sample,
};
use proptest::{prelude::*, sample::Index, test_runner::TestCaseResult};

// ---------------------------------------------------------------------------
// The fixture.

const IDS: [&str; 6] = ["s0", "s1", "s2", "s3", "s4", "s5"];
const POOLS: [Option<&str>; 3] = [Some("gpu"), Some("cpu"), None];
const ZONES: [&str; 2] = ["z1", "z2"];
const ACTORS: [&str; 2] = ["alice@example.com", "ops-bot"];
const NAMES: [&str; 3] = ["maint", "team:ops-1", "alice@example"];
const MAX_VIRTUAL: u32 = 2;
const UNREACHABLE_AFTER: Duration = Duration::from_secs(90);

fn floors() -> Vec<CapacityFloor> {
    ["tag:pool=gpu:2", "tag:pool=cpu:1", "tag:zone=z1:2"]
        .iter()
        .map(|f| CapacityFloor::parse(f).expect("a floor"))
        .collect()
}

fn config() -> FleetConfig {
    FleetConfig {
        unreachable_after: UNREACHABLE_AFTER,
        // No server is forgotten during a case: removal is model.rs's.
        remove_after: Duration::from_secs(30 * 24 * 3600),
        capacity_floors: floors(),
        ..FleetConfig::default()
    }
}

/// A Linux server with room for [`MAX_VIRTUAL`] virtual sessions, in
/// `pool` (untagged when `None`) and `zone`.
fn description(pool: Option<&str>, zone: &str) -> ServerDescription {
    let mut d = sample::description(0);
    d.max_virtual_sessions = MAX_VIRTUAL;
    d.tags = pool
        .map(|p| Tag {
            key: "pool".into(),
            value: p.into(),
        })
        .into_iter()
        .chain([Tag {
            key: "zone".into(),
            value: zone.into(),
        }])
        .collect();
    d
}

// ---------------------------------------------------------------------------
// Inputs, symbolic so that failing cases print and shrink compactly.

#[derive(Debug, Clone, Copy)]
enum IdSel {
    /// A server the fleet knows (a fixture id when it knows none).
    Known(Index),
    /// A fixture id, registered or not.
    Slot(usize),
    /// The empty id: INVALID_SERVER_ID.
    Empty,
}

impl IdSel {
    fn resolve(self, model: &Model) -> String {
        match self {
            IdSel::Known(i) if !model.servers.is_empty() => model
                .servers
                .keys()
                .nth(i.index(model.servers.len()))
                .cloned()
                .expect("index in range"),
            IdSel::Known(i) => IDS[i.index(IDS.len())].to_string(),
            IdSel::Slot(i) => IDS[i].to_string(),
            IdSel::Empty => String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum HoldSel {
    /// No name: the default hold.
    Unnamed,
    /// The default hold by its name.
    DefaultByName,
    Named(usize),
    /// Not a valid hold name: INVALID_HOLD.
    Malformed,
}

impl HoldSel {
    fn resolve(self) -> String {
        match self {
            HoldSel::Unnamed => String::new(),
            HoldSel::DefaultByName => DEFAULT_HOLD_NAME.into(),
            HoldSel::Named(i) => NAMES[i].into(),
            HoldSel::Malformed => "two words".into(),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum ExpirySel {
    Never,
    In(u64),
    /// A day ahead of the wall clock: never reached during a case.
    AtFar,
    /// Invalid: zero.
    InZero,
    /// Invalid: past the longest hold.
    InTooLong,
    /// Invalid: in the past.
    AtPast,
    /// Invalid: past the longest hold.
    AtTooFar,
    /// Invalid as the adapter found it (both ExpiresAt and ExpiresIn).
    Malformed,
}

impl ExpirySel {
    fn resolve(self) -> Expiry {
        let day = Duration::from_secs(24 * 3600);
        match self {
            ExpirySel::Never => Expiry::Never,
            ExpirySel::In(secs) => Expiry::In(Duration::from_secs(secs)),
            ExpirySel::AtFar => Expiry::At(SystemTime::now() + day),
            ExpirySel::InZero => Expiry::In(Duration::ZERO),
            ExpirySel::InTooLong => Expiry::In(MAX_HOLD_DURATION + Duration::from_secs(1)),
            ExpirySel::AtPast => Expiry::At(SystemTime::UNIX_EPOCH),
            ExpirySel::AtTooFar => Expiry::At(SystemTime::now() + MAX_HOLD_DURATION + day),
            ExpirySel::Malformed => {
                Expiry::Malformed("Give at most one of ExpiresAt and ExpiresIn.".into())
            }
        }
    }

    /// When a hold placed at `now` ends by the model's clock, or `Err` when
    /// the expiry is refused.
    fn model_expiry(self, now: Duration) -> Result<Option<Duration>, ()> {
        match self {
            ExpirySel::Never => Ok(None),
            ExpirySel::In(secs) => Ok(Some(now + Duration::from_secs(secs))),
            ExpirySel::AtFar => Ok(Some(Duration::MAX)),
            _ => Err(()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum VersionSel {
    None,
    /// The server's StateVersion as last described.
    Current,
    /// One it had before (or the current one plus one, when it had none).
    Stale(Index),
}

#[derive(Debug, Clone, Copy)]
enum ReasonSel {
    Empty,
    Short,
    /// A newline: INVALID_REASON.
    Invalid,
}

impl ReasonSel {
    fn resolve(self) -> String {
        match self {
            ReasonSel::Empty => String::new(),
            ReasonSel::Short => "kernel update".into(),
            ReasonSel::Invalid => "line\nbreak".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct CloseSpec {
    id: IdSel,
    force: bool,
    reason: ReasonSel,
    hold: HoldSel,
    expiry: ExpirySel,
    version: VersionSel,
    override_floor: bool,
}

#[derive(Debug, Clone)]
struct OpenSpec {
    id: IdSel,
    hold: HoldSel,
    version: VersionSel,
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        slot: usize,
        pool: usize,
        zone: usize,
    },
    Heartbeat {
        id: IdSel,
        healthy: bool,
        console: bool,
        virtuals: u32,
        deleted: u32,
    },
    Deregister {
        id: IdSel,
    },
    Close {
        items: Vec<CloseSpec>,
        actor: usize,
        /// Some(tag key) for a dry run.
        dry: Option<&'static str>,
    },
    Open {
        items: Vec<OpenSpec>,
        dry: Option<&'static str>,
    },
    /// Tokio's clock moves on by this many milliseconds.
    Advance(u64),
    /// `n` closes in a row, one hold each (`pile-0`, `pile-1`, ...),
    /// forced, ending in 30 s: past 16 holds a server takes no more.
    Pile {
        id: IdSel,
        n: usize,
    },
    /// An empty batch (INVALID_ARGUMENT) or one over the limit.
    BadBatch {
        close: bool,
        len: usize,
    },
}

fn id_sel() -> impl Strategy<Value = IdSel> {
    prop_oneof![
        8 => any::<Index>().prop_map(IdSel::Known),
        2 => (0..IDS.len()).prop_map(IdSel::Slot),
        1 => Just(IdSel::Empty),
    ]
}

fn hold_sel() -> impl Strategy<Value = HoldSel> {
    prop_oneof![
        4 => Just(HoldSel::Unnamed),
        1 => Just(HoldSel::DefaultByName),
        5 => (0..NAMES.len()).prop_map(HoldSel::Named),
        1 => Just(HoldSel::Malformed),
    ]
}

fn expiry_sel() -> impl Strategy<Value = ExpirySel> {
    prop_oneof![
        12 => Just(ExpirySel::Never),
        10 => prop::sample::select(vec![1u64, 30, 60, 95]).prop_map(ExpirySel::In),
        1 => Just(ExpirySel::AtFar),
        1 => Just(ExpirySel::InZero),
        1 => Just(ExpirySel::InTooLong),
        1 => Just(ExpirySel::AtPast),
        1 => Just(ExpirySel::AtTooFar),
        1 => Just(ExpirySel::Malformed),
    ]
}

fn version_sel() -> impl Strategy<Value = VersionSel> {
    prop_oneof![
        5 => Just(VersionSel::None),
        4 => Just(VersionSel::Current),
        2 => any::<Index>().prop_map(VersionSel::Stale),
    ]
}

fn reason_sel() -> impl Strategy<Value = ReasonSel> {
    prop_oneof![
        4 => Just(ReasonSel::Empty),
        4 => Just(ReasonSel::Short),
        1 => Just(ReasonSel::Invalid),
    ]
}

fn dry_sel() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some("pool")),
        1 => Just(Some("zone")),
        1 => Just(Some("")),
    ]
}

fn close_spec() -> impl Strategy<Value = CloseSpec> {
    (
        id_sel(),
        prop::bool::weighted(0.4),
        reason_sel(),
        hold_sel(),
        expiry_sel(),
        version_sel(),
        prop::bool::weighted(0.15),
    )
        .prop_map(
            |(id, force, reason, hold, expiry, version, override_floor)| CloseSpec {
                id,
                force,
                reason,
                hold,
                expiry,
                version,
                override_floor,
            },
        )
}

fn open_spec() -> impl Strategy<Value = OpenSpec> {
    (id_sel(), hold_sel(), version_sel()).prop_map(|(id, hold, version)| OpenSpec {
        id,
        hold,
        version,
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..IDS.len(), 0..POOLS.len(), 0..ZONES.len())
            .prop_map(|(slot, pool, zone)| Op::Register { slot, pool, zone }),
        3 => (
            id_sel(),
            prop::bool::weighted(0.85),
            prop::bool::weighted(0.15),
            0..=MAX_VIRTUAL,
            0..=1u32,
        )
            .prop_map(|(id, healthy, console, virtuals, deleted)| Op::Heartbeat {
                id,
                healthy,
                console,
                virtuals,
                deleted,
            }),
        1 => id_sel().prop_map(|id| Op::Deregister { id }),
        7 => (
            prop::collection::vec(close_spec(), 1..=4),
            0..ACTORS.len(),
            dry_sel(),
        )
            .prop_map(|(items, actor, dry)| Op::Close { items, actor, dry }),
        5 => (prop::collection::vec(open_spec(), 1..=4), dry_sel())
            .prop_map(|(items, dry)| Op::Open { items, dry }),
        3 => prop::sample::select(vec![1u64, 999, 1_000, 29_000, 30_000, 31_000, 60_000, 90_001])
            .prop_map(Op::Advance),
        1 => (id_sel(), 14..=MAX_HOLDS_PER_SERVER + 2).prop_map(|(id, n)| Op::Pile { id, n }),
        1 => (any::<bool>(), prop::sample::select(vec![0, MAX_BATCH_ITEMS + 1]))
            .prop_map(|(close, len)| Op::BadBatch { close, len }),
    ]
}

// ---------------------------------------------------------------------------
// The reference model.

#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelHold {
    name: String,
    actor: String,
    reason: String,
    /// By the model's clock; `Duration::MAX` for "not during this case".
    expires_at: Option<Duration>,
}

#[derive(Debug, Clone)]
struct ModelServer {
    pool: Option<&'static str>,
    zone: &'static str,
    /// In order of placement.
    holds: Vec<ModelHold>,
    healthy: bool,
    consoles: u32,
    virtuals: u32,
    last_seen: Duration,
    departed: bool,
}

impl ModelServer {
    fn live_sessions(&self) -> u32 {
        self.consoles + self.virtuals
    }

    fn full(&self) -> bool {
        self.live_sessions() > 0 && !(self.consoles == 0 && self.virtuals < MAX_VIRTUAL)
    }

    fn available(&self, now: Duration) -> bool {
        self.holds.is_empty()
            && !self.departed
            && now - self.last_seen <= UNREACHABLE_AFTER
            && self.healthy
            && !self.full()
    }

    fn tag(&self, key: &str) -> Option<&'static str> {
        match key {
            "pool" => self.pool,
            "zone" => Some(self.zone),
            _ => None,
        }
    }

    fn under(&self, floor: &CapacityFloor) -> bool {
        self.tag(&floor.key) == Some(floor.value.as_str())
    }
}

#[derive(Debug, Clone, Default)]
struct Model {
    /// Tokio's clock since the case began.
    now: Duration,
    servers: BTreeMap<String, ModelServer>,
    /// Servers whose holds changed during the current operation.
    changed: BTreeSet<String>,
}

/// What the model predicts of a version check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VersionCheck {
    Absent,
    Matches,
    Differs,
}

type Codes = Vec<Result<(), FailureCode>>;

fn id_is_valid(id: &str) -> bool {
    !id.is_empty()
}

fn reason_is_valid(reason: &str) -> bool {
    reason.chars().count() <= MAX_REASON_CHARS
        && !reason.chars().any(|c| c.is_control() && c != '\t')
}

fn hold_name_is_valid(name: &str) -> bool {
    name.is_empty() || !name.contains(' ')
}

fn name_or_default(name: &str) -> &str {
    if name.is_empty() {
        DEFAULT_HOLD_NAME
    } else {
        name
    }
}

/// INVALID_SERVER_ID and DUPLICATE_SERVER_ID, per item.
fn id_checks<'a>(ids: impl Iterator<Item = &'a str>) -> Vec<Option<FailureCode>> {
    let mut seen = BTreeSet::new();
    ids.map(|id| {
        if !id_is_valid(id) {
            Some(FailureCode::InvalidServerId)
        } else if !seen.insert(id) {
            Some(FailureCode::DuplicateServerId)
        } else {
            None
        }
    })
    .collect()
}

impl Model {
    fn available_under(&self, floor: &CapacityFloor) -> usize {
        self.servers
            .values()
            .filter(|s| s.under(floor) && s.available(self.now))
            .count()
    }

    /// AVAILABLE servers per value of `key` ("" for untagged), and overall.
    fn capacity(&self, key: &str) -> (BTreeMap<String, u32>, u32) {
        let mut pools = BTreeMap::new();
        let mut overall = 0;
        for s in self.servers.values() {
            let up = u32::from(s.available(self.now));
            if !key.is_empty() {
                *pools
                    .entry(s.tag(key).unwrap_or_default().to_string())
                    .or_default() += up;
            }
            overall += up;
        }
        (pools, overall)
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        let now = self.now;
        for (id, s) in &mut self.servers {
            let before = s.holds.len();
            s.holds.retain(|h| h.expires_at.is_none_or(|at| at > now));
            if s.holds.len() != before {
                self.changed.insert(id.clone());
            }
        }
    }

    fn register(&mut self, id: &str, pool: Option<&'static str>, zone: &'static str) -> bool {
        let now = self.now;
        match self.servers.get_mut(id) {
            Some(s) => {
                s.pool = pool;
                s.zone = zone;
                s.last_seen = now;
                s.departed = false;
                false
            }
            None => {
                self.servers.insert(
                    id.to_string(),
                    ModelServer {
                        pool,
                        zone,
                        holds: Vec::new(),
                        healthy: true,
                        consoles: 0,
                        virtuals: 0,
                        last_seen: now,
                        departed: false,
                    },
                );
                true
            }
        }
    }

    fn close(
        &mut self,
        items: &[CloseItem],
        expiries: &[ExpirySel],
        versions: &[VersionCheck],
        actor: &str,
    ) -> Codes {
        let pre = id_checks(items.iter().map(|i| i.server_id.as_str()));
        let mut out = Vec::new();
        for (((item, pre), expiry), version) in items.iter().zip(pre).zip(expiries).zip(versions) {
            out.push(self.close_one(item, pre, *expiry, *version, actor));
        }
        out
    }

    fn close_one(
        &mut self,
        item: &CloseItem,
        pre: Option<FailureCode>,
        expiry: ExpirySel,
        version: VersionCheck,
        actor: &str,
    ) -> Result<(), FailureCode> {
        if let Some(code) = pre {
            return Err(code);
        }
        if !reason_is_valid(&item.reason) {
            return Err(FailureCode::InvalidReason);
        }
        if !hold_name_is_valid(&item.hold_name) {
            return Err(FailureCode::InvalidHold);
        }
        let expires_at = expiry
            .model_expiry(self.now)
            .map_err(|()| FailureCode::InvalidHold)?;
        let now = self.now;
        let floors = floors();
        let refused_by_floor = {
            let server = self
                .servers
                .get(&item.server_id)
                .ok_or(FailureCode::ServerNotFound)?;
            if version == VersionCheck::Differs {
                return Err(FailureCode::StateVersionMismatch);
            }
            let name = name_or_default(&item.hold_name);
            if server.holds.iter().any(|h| h.name == name) {
                return Ok(());
            }
            if server.holds.len() >= MAX_HOLDS_PER_SERVER {
                return Err(FailureCode::InvalidHold);
            }
            if server.holds.is_empty() && server.live_sessions() > 0 && !item.force {
                return Err(FailureCode::HasRunningSessions);
            }
            server.holds.is_empty()
                && server.available(now)
                && !item.override_floor
                && floors
                    .iter()
                    .any(|f| server.under(f) && self.available_under(f) <= f.min_available as usize)
        };
        if refused_by_floor {
            return Err(FailureCode::CapacityFloor);
        }
        let server = self.servers.get_mut(&item.server_id).expect("found above");
        server.holds.push(ModelHold {
            name: name_or_default(&item.hold_name).to_string(),
            actor: actor.to_string(),
            reason: item.reason.clone(),
            expires_at,
        });
        self.changed.insert(item.server_id.clone());
        Ok(())
    }

    fn open(&mut self, items: &[OpenItem], versions: &[VersionCheck]) -> Codes {
        let pre = id_checks(items.iter().map(|i| i.server_id.as_str()));
        let mut out = Vec::new();
        for ((item, pre), version) in items.iter().zip(pre).zip(versions) {
            out.push(self.open_one(item, pre, *version));
        }
        out
    }

    fn open_one(
        &mut self,
        item: &OpenItem,
        pre: Option<FailureCode>,
        version: VersionCheck,
    ) -> Result<(), FailureCode> {
        if let Some(code) = pre {
            return Err(code);
        }
        if !hold_name_is_valid(&item.hold_name) {
            return Err(FailureCode::InvalidHold);
        }
        let server = self
            .servers
            .get_mut(&item.server_id)
            .ok_or(FailureCode::ServerNotFound)?;
        if version == VersionCheck::Differs {
            return Err(FailureCode::StateVersionMismatch);
        }
        if server.holds.is_empty() {
            return Ok(());
        }
        let name = name_or_default(&item.hold_name);
        if let Some(i) = server.holds.iter().position(|h| h.name == name) {
            server.holds.remove(i);
            self.changed.insert(item.server_id.clone());
        }
        if server.holds.is_empty() {
            Ok(())
        } else {
            Err(FailureCode::HoldsRemain)
        }
    }

    fn describe(&self) -> Vec<Seen> {
        self.servers
            .iter()
            .map(|(id, s)| Seen {
                id: id.clone(),
                holds: s
                    .holds
                    .iter()
                    .map(|h| {
                        (
                            h.name.clone(),
                            h.actor.clone(),
                            h.reason.clone(),
                            h.expires_at.is_some(),
                        )
                    })
                    .collect(),
                closed: !s.holds.is_empty(),
                available: s.available(self.now),
                pool: s.pool.map(str::to_string),
                zone: Some(s.zone.to_string()),
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Observing the fleet.

/// What the test compares of one described server.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    id: String,
    /// (name, actor, reason, expires) in order.
    holds: Vec<(String, String, String, bool)>,
    closed: bool,
    available: bool,
    pool: Option<String>,
    zone: Option<String>,
}

/// The fleet as DescribeServers shows it, with each server's StateVersion.
fn describe(fleet: &Fleet) -> Result<(Vec<Seen>, BTreeMap<String, u64>), TestCaseError> {
    let mut seen = Vec::new();
    let mut versions = BTreeMap::new();
    let next = fleet
        .describe_servers(&DescribeQuery::default(), |view: ServerView<'_>| {
            let r = view.record;
            versions.insert(r.id.to_string(), r.state_version);
            seen.push(Seen {
                id: r.id.to_string(),
                holds: r
                    .holds
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            h.actor.to_string(),
                            h.reason.clone(),
                            h.expires_at.is_some(),
                        )
                    })
                    .collect(),
                closed: r.is_closed(),
                available: view.reasons.is_available(),
                pool: r.tag("pool").map(|v| v.into_owned()),
                zone: r.tag("zone").map(|v| v.into_owned()),
            });
        })
        .map_err(|e| TestCaseError::fail(format!("DescribeServers failed: {e}")))?;
    prop_assert!(next.is_none(), "six servers fit one page");
    Ok((seen, versions))
}

fn codes(results: &[ItemResult]) -> Codes {
    results
        .iter()
        .map(|r| r.as_ref().map(|_| ()).map_err(|f| f.code))
        .collect()
}

fn available_under(seen: &[Seen], floor: &CapacityFloor) -> usize {
    seen.iter()
        .filter(|s| {
            s.available
                && match floor.key.as_str() {
                    "pool" => s.pool.as_deref() == Some(floor.value.as_str()),
                    "zone" => s.zone.as_deref() == Some(floor.value.as_str()),
                    _ => false,
                }
        })
        .count()
}

/// A dry run's blast radius against the model before (`self`) and after
/// (`after`) the real call: the servers acted on (`acted`, in request
/// order) and the capacity counts.
fn check_radius(
    radius: &BlastRadius,
    key: &str,
    before: &Model,
    after: &Model,
    acted: &[String],
) -> TestCaseResult {
    let servers: Vec<(String, bool, bool)> = radius
        .servers
        .iter()
        .map(|s| (s.server_id.clone(), s.available_before, s.available_after))
        .collect();
    let expected: Vec<(String, bool, bool)> = acted
        .iter()
        .map(|id| {
            (
                id.clone(),
                before.servers[id].available(before.now),
                after.servers[id].available(after.now),
            )
        })
        .collect();
    prop_assert_eq!(servers, expected, "blast radius servers");
    let (pools_before, overall_before) = before.capacity(key);
    let (pools_after, overall_after) = after.capacity(key);
    prop_assert_eq!(
        (radius.overall.before, radius.overall.after),
        (overall_before, overall_after),
        "overall capacity"
    );
    let pools: Vec<(String, String, u32, u32)> = radius
        .pools
        .iter()
        .map(|p| (p.key.clone(), p.value.clone(), p.before, p.after))
        .collect();
    let expected: Vec<(String, String, u32, u32)> = pools_before
        .iter()
        .map(|(value, n)| (key.to_string(), value.clone(), *n, pools_after[value]))
        .collect();
    prop_assert_eq!(pools, expected, "pool capacity");
    Ok(())
}

// ---------------------------------------------------------------------------
// Running a case.

struct Case {
    fleet: Fleet,
    model: Model,
    /// StateVersions as last described.
    versions: BTreeMap<String, u64>,
    /// Every StateVersion each server was seen with.
    history: BTreeMap<String, Vec<u64>>,
    last_seen: Vec<Seen>,
}

fn whole(e: &FleetError) -> &'static str {
    match e {
        FleetError::InvalidArgument(_) => "invalid",
        FleetError::ServerNotFound(..) => "not found",
        _ => "other",
    }
}

impl Case {
    /// The expected version to send for `sel` on `id`, and what the model
    /// makes of it.
    fn version(&self, id: &str, sel: VersionSel) -> (Option<u64>, VersionCheck) {
        let current = self.versions.get(id).copied();
        match (sel, current) {
            (VersionSel::None, _) => (None, VersionCheck::Absent),
            (VersionSel::Current, Some(v)) => (Some(v), VersionCheck::Matches),
            (VersionSel::Stale(pick), Some(v)) => {
                let old: Vec<u64> = self.history[id]
                    .iter()
                    .copied()
                    .filter(|&o| o != v)
                    .collect();
                let stale = if old.is_empty() {
                    v + 1
                } else {
                    old[pick.index(old.len())]
                };
                (Some(stale), VersionCheck::Differs)
            }
            // An unknown server: any number; the item fails as not found.
            (_, None) => (Some(1), VersionCheck::Differs),
        }
    }

    async fn apply(&mut self, op: &Op) -> TestCaseResult {
        match op {
            Op::Register { slot, pool, zone } => {
                let (pool, zone) = (POOLS[*pool], ZONES[*zone]);
                let new = self
                    .fleet
                    .register(IDS[*slot], description(pool, zone))
                    .await
                    .map_err(|e| TestCaseError::fail(format!("register: {e}")))?;
                prop_assert_eq!(new, self.model.register(IDS[*slot], pool, zone), "new");
            }
            Op::Heartbeat {
                id,
                healthy,
                console,
                virtuals,
                deleted,
            } => {
                let id = id.resolve(&self.model);
                let kinds = (0..*virtuals)
                    .map(|_| (SessionKind::Virtual, SessionState::Ready))
                    .chain(console.then_some((SessionKind::Console, SessionState::Ready)))
                    .chain((0..*deleted).map(|_| (SessionKind::Virtual, SessionState::Deleted)));
                let report = Heartbeat {
                    dcv_server_healthy: *healthy,
                    sessions: kinds
                        .enumerate()
                        .map(|(n, (kind, state))| ReportedSession {
                            id: format!("{id}-session-{n}"),
                            owner: "user".into(),
                            kind,
                            state,
                            details: Default::default(),
                        })
                        .collect(),
                    ..Heartbeat::default()
                };
                let actual = self.fleet.heartbeat(&id, report).map_err(|e| whole(&e));
                let now = self.model.now;
                let expected = if !id_is_valid(&id) {
                    Err("invalid")
                } else if let Some(s) = self.model.servers.get_mut(&id) {
                    s.healthy = *healthy;
                    s.consoles = u32::from(*console);
                    s.virtuals = *virtuals;
                    s.last_seen = now;
                    s.departed = false;
                    Ok(())
                } else {
                    Err("not found")
                };
                prop_assert_eq!(actual, expected, "heartbeat");
            }
            Op::Deregister { id } => {
                let id = id.resolve(&self.model);
                let actual = self.fleet.deregister(&id).await.map_err(|e| whole(&e));
                let expected = if !id_is_valid(&id) {
                    Err("invalid")
                } else {
                    match self.model.servers.get_mut(&id) {
                        None => Err("not found"),
                        Some(s) if !s.holds.is_empty() => {
                            s.departed = true;
                            Ok(false)
                        }
                        Some(_) => {
                            self.model.servers.remove(&id);
                            Ok(true)
                        }
                    }
                };
                prop_assert_eq!(actual, expected, "deregister");
            }
            Op::Close { items, actor, dry } => {
                let mut close = Vec::new();
                let mut checks = Vec::new();
                for spec in items {
                    let id = spec.id.resolve(&self.model);
                    let (expected_version, check) = self.version(&id, spec.version);
                    checks.push(check);
                    close.push(CloseItem {
                        server_id: id,
                        force: spec.force,
                        reason: spec.reason.resolve(),
                        hold_name: spec.hold.resolve(),
                        expiry: spec.expiry.resolve(),
                        expected_version,
                        override_floor: spec.override_floor,
                    });
                }
                let expiries: Vec<ExpirySel> = items.iter().map(|s| s.expiry).collect();
                let actor = ACTORS[*actor];
                match dry {
                    Some(key) => {
                        let mut after = self.model.clone();
                        let expected = after.close(&close, &expiries, &checks, actor);
                        let (results, radius) = self
                            .fleet
                            .close_servers_dry_run(&close, key)
                            .map_err(|e| TestCaseError::fail(format!("dry run: {e}")))?;
                        prop_assert_eq!(codes(&results), expected.clone(), "dry-run items");
                        let acted: Vec<String> = close
                            .iter()
                            .zip(&expected)
                            .filter(|(_, r)| r.is_ok())
                            .map(|(i, _)| i.server_id.clone())
                            .collect();
                        check_radius(&radius, key, &self.model, &after, &acted)?;
                        let (now, _) = describe(&self.fleet)?;
                        prop_assert_eq!(&now, &self.last_seen, "a dry run changed the fleet");
                    }
                    None => {
                        let expected = self.model.close(&close, &expiries, &checks, actor);
                        let results = self
                            .fleet
                            .close_servers(&close, actor)
                            .await
                            .map_err(|e| TestCaseError::fail(format!("close: {e}")))?;
                        prop_assert_eq!(codes(&results), expected, "close items");
                        // The floors' promise, checked on the fleet itself.
                        if !close.iter().any(|i| i.override_floor) {
                            let (now, _) = describe(&self.fleet)?;
                            for floor in floors() {
                                let before = available_under(&self.last_seen, &floor);
                                let after = available_under(&now, &floor);
                                prop_assert!(
                                    after >= before.min(floor.min_available as usize),
                                    "{} went from {} to {} AVAILABLE",
                                    floor.pool(),
                                    before,
                                    after
                                );
                            }
                        }
                    }
                }
            }
            Op::Open { items, dry } => {
                let mut open = Vec::new();
                let mut checks = Vec::new();
                for spec in items {
                    let id = spec.id.resolve(&self.model);
                    let (expected_version, check) = self.version(&id, spec.version);
                    checks.push(check);
                    open.push(OpenItem {
                        server_id: id,
                        hold_name: spec.hold.resolve(),
                        expected_version,
                    });
                }
                match dry {
                    Some(key) => {
                        let mut after = self.model.clone();
                        let expected = after.open(&open, &checks);
                        let (results, radius) = self
                            .fleet
                            .open_servers_dry_run(&open, key)
                            .map_err(|e| TestCaseError::fail(format!("dry run: {e}")))?;
                        prop_assert_eq!(codes(&results), expected.clone(), "dry-run items");
                        // Acted on: every success, and every HOLDS_REMAIN
                        // that still removes the hold it names.
                        let acted: Vec<String> = open
                            .iter()
                            .zip(&expected)
                            .filter(|(i, r)| match r {
                                Ok(()) => true,
                                Err(FailureCode::HoldsRemain) => self.model.servers[&i.server_id]
                                    .holds
                                    .iter()
                                    .any(|h| h.name == name_or_default(&i.hold_name)),
                                Err(_) => false,
                            })
                            .map(|(i, _)| i.server_id.clone())
                            .collect();
                        check_radius(&radius, key, &self.model, &after, &acted)?;
                        let (now, _) = describe(&self.fleet)?;
                        prop_assert_eq!(&now, &self.last_seen, "a dry run changed the fleet");
                    }
                    None => {
                        let expected = self.model.open(&open, &checks);
                        let results = self
                            .fleet
                            .open_servers(&open)
                            .await
                            .map_err(|e| TestCaseError::fail(format!("open: {e}")))?;
                        prop_assert_eq!(codes(&results), expected, "open items");
                    }
                }
            }
            Op::Advance(ms) => {
                let by = Duration::from_millis(*ms);
                tokio::time::advance(by).await;
                self.model.advance(by);
            }
            Op::Pile { id, n } => {
                let id = id.resolve(&self.model);
                for k in 0..*n {
                    let item = [CloseItem {
                        server_id: id.clone(),
                        force: true,
                        hold_name: format!("pile-{k}"),
                        expiry: Expiry::In(Duration::from_secs(30)),
                        ..CloseItem::default()
                    }];
                    let expected = self.model.close(
                        &item,
                        &[ExpirySel::In(30)],
                        &[VersionCheck::Absent],
                        ACTORS[1],
                    );
                    let results = self
                        .fleet
                        .close_servers(&item, ACTORS[1])
                        .await
                        .map_err(|e| TestCaseError::fail(format!("close: {e}")))?;
                    prop_assert_eq!(codes(&results), expected, "pile item {}", k);
                }
            }
            Op::BadBatch { close, len } => {
                let ids = || (0..*len).map(|i| IDS[i % IDS.len()].to_string());
                let outcome = if *close {
                    let items: Vec<CloseItem> = ids()
                        .map(|server_id| CloseItem {
                            server_id,
                            hold_name: "maint".into(),
                            ..CloseItem::default()
                        })
                        .collect();
                    let dry = self.fleet.close_servers_dry_run(&items, "pool").map(drop);
                    prop_assert!(matches!(dry, Err(FleetError::InvalidArgument(_))));
                    self.fleet.close_servers(&items, ACTORS[0]).await.map(drop)
                } else {
                    let items: Vec<OpenItem> = ids()
                        .map(|server_id| OpenItem {
                            server_id,
                            ..OpenItem::default()
                        })
                        .collect();
                    let dry = self.fleet.open_servers_dry_run(&items, "pool").map(drop);
                    prop_assert!(matches!(dry, Err(FleetError::InvalidArgument(_))));
                    self.fleet.open_servers(&items).await.map(drop)
                };
                prop_assert!(
                    matches!(outcome, Err(FleetError::InvalidArgument(_))),
                    "a batch of {} items: {:?}",
                    len,
                    outcome
                );
            }
        }
        Ok(())
    }

    /// Compares the fleet with the model, and each StateVersion with the
    /// last: greater where the model's holds changed, the same elsewhere.
    fn check(&mut self) -> TestCaseResult {
        let (seen, versions) = describe(&self.fleet)?;
        prop_assert_eq!(&seen, &self.model.describe(), "DescribeServers");
        for (id, &now) in &versions {
            let Some(&before) = self.versions.get(id) else {
                continue;
            };
            if self.model.changed.contains(id) {
                prop_assert!(
                    now > before,
                    "{}: holds changed, version {} stayed",
                    id,
                    now
                );
            } else {
                prop_assert_eq!(now, before, "{}: holds unchanged, version moved", id);
            }
        }
        for (id, &v) in &versions {
            let history = self.history.entry(id.clone()).or_default();
            if history.last() != Some(&v) {
                history.push(v);
            }
        }
        // A server forgotten starts a new history if it comes back.
        self.history.retain(|id, _| versions.contains_key(id));
        self.versions = versions;
        self.last_seen = seen;
        self.model.changed.clear();
        Ok(())
    }
}

async fn run_case(initial: &[(usize, usize)], ops: &[Op]) -> TestCaseResult {
    let fleet = Fleet::new(config()).expect("fleet");
    let mut case = Case {
        fleet,
        model: Model::default(),
        versions: BTreeMap::new(),
        history: BTreeMap::new(),
        last_seen: Vec::new(),
    };
    for (slot, &(pool, zone)) in initial.iter().enumerate() {
        case.apply(&Op::Register { slot, pool, zone }).await?;
    }
    case.check()?;
    for (step, op) in ops.iter().enumerate() {
        case.apply(op)
            .await
            .map_err(|e| TestCaseError::fail(format!("step {step} {op:?}: {e}")))?;
        case.check()
            .map_err(|e| TestCaseError::fail(format!("after step {step} {op:?}: {e}")))?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // Integration tests have no lib.rs beside them for proptest to store
        // regressions next to; a failure prints its shrunk case instead.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn holds_versions_and_floors_match_reference_model(
        initial in prop::collection::vec((0..POOLS.len(), 0..ZONES.len()), 0..=IDS.len()),
        ops in prop::collection::vec(op(), 1..=40),
    ) {
        // A paused clock per case: holds expire and agents fall silent
        // only when an operation advances it.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime");
        runtime.block_on(run_case(&initial, &ops))?;
    }
}
