//! Model-based property test of the fleet's registration, heartbeat, close,
//! open, deregister and describe semantics.
//!
//! Proptest generates random sequences of operations (agents registering,
//! re-registering, heartbeating with live and deleted sessions, and
//! deregistering; operators closing and opening servers in batches mixing
//! valid, unknown, empty, over-long and repeated ids, good and bad reasons,
//! forced and unforced closes, plus rare batches of 0, 1000 or 1001 items)
//! and applies each one both to the real [`Fleet`] and to a deliberately
//! naive reference model: a `BTreeMap` from id to
//! `{closed: Option<(actor, reason)>, live_sessions, departed}`.
//!
//! After every operation it checks that:
//! - the operation's outcome is the model's: the same whole-request error
//!   (InvalidArgument naming the same field, or ServerNotFound for the same
//!   id), or for a batch the same per-item results in request order, with
//!   identical failure codes, the exact `Dcv server not found.` text, and a
//!   running-session failure that names the model's live-session count;
//! - a complete DescribeServers walk, paged with a small MaxResults and
//!   NextToken, returns exactly the model's ids in ascending byte order,
//!   each with the model's closed state, a single Closed hold carrying the
//!   FIRST close's actor and reason, the model's live (non-Deleted) session
//!   count, SERVER_CLOSED among its unavailability reasons exactly when
//!   closed and UNREACHABLE_AGENT exactly when its agent departed; every
//!   page but the last is full and no token leads to an empty page;
//! - a walk filtered on `unavailability-reason=SERVER_CLOSED` returns
//!   exactly the model's closed servers.
//!
//! Heartbeat timeouts are out of scope: the default configuration marks a
//! server unreachable after 90 s and forgets it after an hour, far longer
//! than a test case runs, so no server expires during the test.

use std::collections::{BTreeMap, HashSet};

use dcv_broker::{
    demo,
    fleet::{
        CloseItem, DescribeQuery, FailureCode, Fleet, FleetConfig, FleetError, ItemResult,
        MAX_BATCH_ITEMS, OpenItem, Reason, ReportedSession, ServerView, SessionKind, SessionState,
        model::{HoldKind, MAX_REASON_CHARS, MAX_SERVER_ID_BYTES},
    },
};
use proptest::{prelude::*, sample::Index, test_runner::TestCaseResult};

// ---------------------------------------------------------------------------
// Inputs. Ids and reasons are symbolic so that failing cases print (and
// shrink) compactly; they are resolved to strings when applied.

/// Valid ids: prefixes of one another (`dcv`, `dcv-1`, ...), a multibyte
/// one that sorts last, and one of exactly the maximum length.
const POOL_LEN: usize = 6;

fn pool_id(i: usize) -> String {
    match i {
        0 => "dcv".into(),
        1 => "dcv-0000001".into(),
        2 => "dcv-1".into(),
        3 => "serverId1".into(),
        4 => "Ωmega-é".into(),
        5 => "m".repeat(MAX_SERVER_ID_BYTES),
        _ => unreachable!("pool has {POOL_LEN} ids"),
    }
}

const ACTORS: [&str; 2] = ["alice@example.com", "ops-bot"];

#[derive(Debug, Clone, Copy)]
enum IdSel {
    /// A valid id from the pool, registered or not.
    Pool(usize),
    /// A server the fleet knows right now (a pool id when it knows none).
    Known(Index),
    /// The empty id: INVALID_SERVER_ID.
    Empty,
    /// One byte over the limit (and an extension of pool id 5).
    TooLong,
}

impl IdSel {
    fn resolve(self, model: &Model) -> String {
        match self {
            IdSel::Pool(i) => pool_id(i),
            IdSel::Known(pick) if !model.servers.is_empty() => model
                .servers
                .keys()
                .nth(pick.index(model.servers.len()))
                .cloned()
                .expect("index in range"),
            IdSel::Known(pick) => pool_id(pick.index(POOL_LEN)),
            IdSel::Empty => String::new(),
            IdSel::TooLong => "m".repeat(MAX_SERVER_ID_BYTES + 1),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum ReasonSel {
    Empty,
    Short,
    /// Tab is the one control character allowed.
    Tab,
    /// Exactly the limit in characters, twice that in bytes: valid.
    MaxMultibyte,
    /// One character over the limit.
    TooLong,
    Newline,
    Delete,
}

impl ReasonSel {
    fn resolve(self) -> String {
        match self {
            ReasonSel::Empty => String::new(),
            ReasonSel::Short => "maintenance window".into(),
            ReasonSel::Tab => "ticket\tOPS-42".into(),
            ReasonSel::MaxMultibyte => "é".repeat(MAX_REASON_CHARS),
            ReasonSel::TooLong => "r".repeat(MAX_REASON_CHARS + 1),
            ReasonSel::Newline => "line one\nline two".into(),
            ReasonSel::Delete => "rubout\u{7f}".into(),
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        id: IdSel,
        description: usize,
    },
    Heartbeat {
        id: IdSel,
        template: usize,
        sessions: Vec<(SessionKind, SessionState)>,
    },
    Close {
        items: Vec<(IdSel, bool, ReasonSel)>,
        actor: usize,
    },
    Open {
        ids: Vec<IdSel>,
    },
    Deregister {
        id: IdSel,
    },
    /// A close batch of `len` items cycling through the pool and the
    /// invalid ids (0 and 1001 fail as a whole; 1000 is the largest legal).
    CloseSized {
        len: usize,
        actor: usize,
    },
    /// The same for open.
    OpenSized {
        len: usize,
    },
}

/// Ids for operations on existing servers: mostly known ones.
fn id_sel() -> impl Strategy<Value = IdSel> {
    prop_oneof![
        5 => any::<Index>().prop_map(IdSel::Known),
        4 => (0..POOL_LEN).prop_map(IdSel::Pool),
        1 => Just(IdSel::Empty),
        1 => Just(IdSel::TooLong),
    ]
}

/// Ids to register: mostly from the pool, sometimes a known one again.
fn register_sel() -> impl Strategy<Value = IdSel> {
    prop_oneof![
        12 => (0..POOL_LEN).prop_map(IdSel::Pool),
        4 => any::<Index>().prop_map(IdSel::Known),
        1 => Just(IdSel::Empty),
        1 => Just(IdSel::TooLong),
    ]
}

fn reason_sel() -> impl Strategy<Value = ReasonSel> {
    prop_oneof![
        4 => Just(ReasonSel::Empty),
        4 => Just(ReasonSel::Short),
        1 => Just(ReasonSel::Tab),
        1 => Just(ReasonSel::MaxMultibyte),
        1 => Just(ReasonSel::TooLong),
        1 => Just(ReasonSel::Newline),
        1 => Just(ReasonSel::Delete),
    ]
}

fn session() -> impl Strategy<Value = (SessionKind, SessionState)> {
    (
        prop::sample::select(vec![SessionKind::Console, SessionKind::Virtual]),
        prop_oneof![
            3 => Just(SessionState::Deleted),
            2 => Just(SessionState::Ready),
            1 => Just(SessionState::Creating),
            1 => Just(SessionState::Deleting),
            1 => Just(SessionState::Unknown),
        ],
    )
}

fn op() -> impl Strategy<Value = Op> {
    let sized = prop::sample::select(vec![0, 1, MAX_BATCH_ITEMS, MAX_BATCH_ITEMS + 1]);
    prop_oneof![
        7 => (register_sel(), 0..8usize)
            .prop_map(|(id, description)| Op::Register { id, description }),
        5 => (id_sel(), 0..8usize, prop::collection::vec(session(), 0..=3))
            .prop_map(|(id, template, sessions)| Op::Heartbeat { id, template, sessions }),
        5 => (
            prop::collection::vec((id_sel(), any::<bool>(), reason_sel()), 1..=8),
            0..ACTORS.len(),
        )
            .prop_map(|(items, actor)| Op::Close { items, actor }),
        4 => prop::collection::vec(id_sel(), 1..=8).prop_map(|ids| Op::Open { ids }),
        2 => id_sel().prop_map(|id| Op::Deregister { id }),
        1 => (sized.clone(), 0..ACTORS.len()).prop_map(|(len, actor)| Op::CloseSized { len, actor }),
        1 => sized.prop_map(|len| Op::OpenSized { len }),
    ]
}

fn sized_id(i: usize) -> String {
    match i % (POOL_LEN + 2) {
        n if n < POOL_LEN => pool_id(n),
        n if n == POOL_LEN => String::new(),
        _ => "m".repeat(MAX_SERVER_ID_BYTES + 1),
    }
}

// ---------------------------------------------------------------------------
// The reference model.

#[derive(Debug, Clone, Default)]
struct ModelServer {
    /// The first close's actor and reason, while closed.
    closed: Option<(String, String)>,
    /// Reported sessions not in state Deleted.
    live_sessions: usize,
    /// Deregistered while closed, not heard from since.
    departed: bool,
}

#[derive(Debug, Default)]
struct Model {
    servers: BTreeMap<String, ModelServer>,
}

/// A whole-request error, reduced to what the model predicts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum WholeError {
    /// InvalidArgument with a single violation of this field.
    Invalid(String),
    /// InvalidArgument with several violations, of these fields.
    InvalidMany(Vec<String>),
    ServerNotFound(String),
    /// Anything else (never predicted by the model).
    Other(String),
}

fn whole_error(e: &FleetError) -> WholeError {
    match e {
        FleetError::InvalidArgument(v) if v.len() == 1 => WholeError::Invalid(v[0].field.clone()),
        FleetError::InvalidArgument(v) => {
            WholeError::InvalidMany(v.iter().map(|v| v.field.clone()).collect())
        }
        FleetError::ServerNotFound(id, _) => WholeError::ServerNotFound(id.clone()),
        other => WholeError::Other(format!("{other:?}")),
    }
}

/// What the model knows about a failed item's reason text.
#[derive(Debug, Clone)]
enum ReasonCheck {
    Exact(&'static str),
    Contains(String),
    NonEmpty,
}

#[derive(Debug, Clone)]
struct Expected {
    code: FailureCode,
    reason: ReasonCheck,
}

impl Expected {
    fn new(code: FailureCode) -> Self {
        Expected {
            code,
            reason: ReasonCheck::NonEmpty,
        }
    }

    fn not_found() -> Self {
        Expected {
            code: FailureCode::ServerNotFound,
            reason: ReasonCheck::Exact("Dcv server not found."),
        }
    }
}

type ExpectedBatch = Result<Vec<Result<(), Expected>>, WholeError>;

fn id_is_valid(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_SERVER_ID_BYTES
}

fn reason_is_valid(reason: &str) -> bool {
    reason.chars().count() <= MAX_REASON_CHARS
        && !reason.chars().any(|c| c.is_control() && c != '\t')
}

/// Batch-level validation plus the stateless per-item checks shared by
/// close and open: `Some(failure)` for items that are not applied.
fn model_precheck<'a>(
    ids: impl ExactSizeIterator<Item = &'a str>,
) -> Result<Vec<Option<Expected>>, WholeError> {
    if ids.len() == 0 || ids.len() > MAX_BATCH_ITEMS {
        return Err(WholeError::Invalid("Servers".into()));
    }
    let mut seen = HashSet::new();
    Ok(ids
        .map(|id| {
            if !id_is_valid(id) {
                Some(Expected::new(FailureCode::InvalidServerId))
            } else if !seen.insert(id) {
                Some(Expected::new(FailureCode::DuplicateServerId))
            } else {
                None
            }
        })
        .collect())
}

impl Model {
    fn register(&mut self, id: &str) -> Result<bool, WholeError> {
        if !id_is_valid(id) {
            return Err(WholeError::Invalid("ServerId".into()));
        }
        match self.servers.get_mut(id) {
            // A refresh keeps the holds and the last reported sessions.
            Some(server) => {
                server.departed = false;
                Ok(false)
            }
            None => {
                self.servers.insert(id.to_string(), ModelServer::default());
                Ok(true)
            }
        }
    }

    fn heartbeat(&mut self, id: &str, sessions: &[ReportedSession]) -> Result<(), WholeError> {
        // A server runs at most one console session: the second live one
        // reported is refused, as is an invalid id, before any lookup.
        let mut bad = Vec::new();
        if !id_is_valid(id) {
            bad.push("ServerId".to_string());
        }
        let second_console = sessions
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind == SessionKind::Console && s.state != SessionState::Deleted)
            .nth(1);
        if let Some((i, _)) = second_console {
            bad.push(format!("Sessions[{i}].Type"));
        }
        match bad.len() {
            0 => {}
            1 => return Err(WholeError::Invalid(bad.remove(0))),
            _ => return Err(WholeError::InvalidMany(bad)),
        }
        let server = self
            .servers
            .get_mut(id)
            .ok_or_else(|| WholeError::ServerNotFound(id.to_string()))?;
        server.live_sessions = sessions
            .iter()
            .filter(|s| s.state != SessionState::Deleted)
            .count();
        server.departed = false;
        Ok(())
    }

    fn deregister(&mut self, id: &str) -> Result<bool, WholeError> {
        if !id_is_valid(id) {
            return Err(WholeError::Invalid("ServerId".into()));
        }
        let server = self
            .servers
            .get_mut(id)
            .ok_or_else(|| WholeError::ServerNotFound(id.to_string()))?;
        if server.closed.is_some() {
            server.departed = true;
            Ok(false)
        } else {
            self.servers.remove(id);
            Ok(true)
        }
    }

    fn close(&mut self, items: &[CloseItem], actor: &str) -> ExpectedBatch {
        let pre = model_precheck(items.iter().map(|i| i.server_id.as_str()))?;
        Ok(items
            .iter()
            .zip(pre)
            .map(|(item, pre)| {
                if let Some(failure) = pre {
                    return Err(failure);
                }
                if !reason_is_valid(&item.reason) {
                    return Err(Expected::new(FailureCode::InvalidReason));
                }
                let server = self
                    .servers
                    .get_mut(&item.server_id)
                    .ok_or_else(Expected::not_found)?;
                if server.closed.is_some() {
                    return Ok(());
                }
                if server.live_sessions > 0 && !item.force {
                    return Err(Expected {
                        code: FailureCode::HasRunningSessions,
                        reason: ReasonCheck::Contains(format!(
                            "has {} running session",
                            server.live_sessions
                        )),
                    });
                }
                server.closed = Some((actor.to_string(), item.reason.clone()));
                Ok(())
            })
            .collect())
    }

    fn open(&mut self, ids: &[String]) -> ExpectedBatch {
        let pre = model_precheck(ids.iter().map(String::as_str))?;
        Ok(ids
            .iter()
            .zip(pre)
            .map(|(id, pre)| {
                if let Some(failure) = pre {
                    return Err(failure);
                }
                let server = self.servers.get_mut(id).ok_or_else(Expected::not_found)?;
                server.closed = None;
                Ok(())
            })
            .collect())
    }

    /// What a full DescribeServers walk should show.
    fn describe(&self) -> Vec<Seen> {
        self.servers
            .iter()
            .map(|(id, s)| Seen {
                id: id.clone(),
                closed: s.closed.is_some(),
                closed_holds: usize::from(s.closed.is_some()),
                hold: s.closed.clone(),
                live_sessions: s.live_sessions,
                reason_closed: s.closed.is_some(),
                reason_unreachable: s.departed,
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Observing the real fleet.

/// What the test compares of one described server.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    id: String,
    closed: bool,
    /// How many Closed holds the record carries (must be 0 or 1).
    closed_holds: usize,
    /// Actor and reason of the first Closed hold.
    hold: Option<(String, String)>,
    live_sessions: usize,
    reason_closed: bool,
    reason_unreachable: bool,
}

fn seen(view: ServerView<'_>) -> Seen {
    let record = view.record;
    let mut closed_holds = record.holds.iter().filter(|h| h.kind == HoldKind::Closed);
    let hold = closed_holds
        .clone()
        .next()
        .map(|h| (h.actor.to_string(), h.reason.clone()));
    Seen {
        id: record.id.to_string(),
        closed: record.is_closed(),
        closed_holds: closed_holds.by_ref().count(),
        hold,
        live_sessions: record.live_sessions().count(),
        reason_closed: view.reasons.contains(Reason::ServerClosed),
        reason_unreachable: view.reasons.contains(Reason::UnreachableAgent),
    }
}

/// Walks every page of a DescribeServers query with `page_size`, checking
/// the paging invariants on the way.
fn walk(
    fleet: &Fleet,
    page_size: usize,
    filters: &[(&str, &str)],
) -> Result<Vec<Seen>, TestCaseError> {
    let mut out = Vec::new();
    let mut token = String::new();
    for _ in 0..=POOL_LEN + 1 {
        let query = DescribeQuery {
            next_token: token.clone(),
            max_results: Some(page_size as i32),
            filters: filters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..DescribeQuery::default()
        };
        let mut page = Vec::new();
        let next = fleet
            .describe_servers(&query, |view| page.push(seen(view)))
            .map_err(|e| TestCaseError::fail(format!("DescribeServers failed: {e}")))?;
        prop_assert!(page.len() <= page_size, "page larger than MaxResults");
        prop_assert!(
            token.is_empty() || !page.is_empty(),
            "a NextToken led to an empty page"
        );
        out.extend(page.iter().cloned());
        match next {
            None => return Ok(out),
            Some(next) => {
                prop_assert_eq!(page.len(), page_size, "a page with a NextToken is not full");
                prop_assert!(!next.is_empty(), "empty NextToken returned");
                token = next;
            }
        }
    }
    Err(TestCaseError::fail(
        "DescribeServers walk did not end: more pages than servers",
    ))
}

fn compare_batch(
    actual: Result<Vec<ItemResult>, FleetError>,
    expected: ExpectedBatch,
) -> TestCaseResult {
    let (actual, expected) = match (actual, expected) {
        (Err(a), Err(e)) => {
            prop_assert_eq!(whole_error(&a), e);
            return Ok(());
        }
        (Ok(a), Ok(e)) => (a, e),
        (a, e) => {
            return Err(TestCaseError::fail(format!(
                "batch outcome differs: fleet {a:?}, model {e:?}"
            )));
        }
    };
    let actual_codes: Vec<Result<(), FailureCode>> = actual
        .iter()
        .map(|r| r.as_ref().map(|_| ()).map_err(|f| f.code))
        .collect();
    let expected_codes: Vec<Result<(), FailureCode>> = expected
        .iter()
        .map(|r| r.as_ref().map(|_| ()).map_err(|f| f.code))
        .collect();
    prop_assert_eq!(actual_codes, expected_codes, "per-item results differ");
    for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
        if let (Err(a), Err(e)) = (a, e) {
            match &e.reason {
                ReasonCheck::Exact(text) => prop_assert_eq!(&a.reason, text, "item {}", i),
                ReasonCheck::Contains(part) => prop_assert!(
                    a.reason.contains(part.as_str()),
                    "item {}: reason {:?} lacks {:?}",
                    i,
                    a.reason,
                    part
                ),
                ReasonCheck::NonEmpty => {
                    prop_assert!(!a.reason.is_empty(), "item {}: empty FailureReason", i)
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Running a case.

/// Runs a fleet operation to completion. With the in-memory store nothing
/// waits for a disk, so a current-thread runtime finishes it at once.
fn block<F: std::future::Future>(future: F) -> F::Output {
    thread_local! {
        static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
    }
    RUNTIME.with(|rt| rt.block_on(future))
}

fn apply(fleet: &Fleet, model: &mut Model, op: &Op) -> TestCaseResult {
    match op {
        Op::Register { id, description } => {
            let id = id.resolve(model);
            let actual = fleet.register(&id, demo::description(*description));
            let actual = block(actual).map_err(|e| whole_error(&e));
            prop_assert_eq!(actual, model.register(&id), "register {:?}", id);
        }
        Op::Heartbeat {
            id,
            template,
            sessions,
        } => {
            let id = id.resolve(model);
            let mut report = demo::heartbeat(*template);
            report.sessions = sessions
                .iter()
                .enumerate()
                .map(|(n, &(kind, state))| ReportedSession {
                    id: format!("session-{n}"),
                    owner: format!("user{n}"),
                    kind,
                    state,
                    details: Default::default(),
                })
                .collect();
            let expected = model.heartbeat(&id, &report.sessions);
            let actual = fleet.heartbeat(&id, report).map_err(|e| whole_error(&e));
            prop_assert_eq!(actual, expected, "heartbeat {:?}", id);
        }
        Op::Deregister { id } => {
            let id = id.resolve(model);
            let actual = block(fleet.deregister(&id)).map_err(|e| whole_error(&e));
            prop_assert_eq!(actual, model.deregister(&id), "deregister {:?}", id);
        }
        Op::Close { items, actor } => {
            let items: Vec<CloseItem> = items
                .iter()
                .map(|&(id, force, reason)| CloseItem {
                    server_id: id.resolve(model),
                    force,
                    reason: reason.resolve(),
                    ..Default::default()
                })
                .collect();
            let actor = ACTORS[*actor];
            compare_batch(
                block(fleet.close_servers(&items, actor)),
                model.close(&items, actor),
            )?;
        }
        Op::CloseSized { len, actor } => {
            let items: Vec<CloseItem> = (0..*len)
                .map(|i| CloseItem {
                    server_id: sized_id(i),
                    force: i % 2 == 0,
                    reason: format!("bulk {i}"),
                    ..Default::default()
                })
                .collect();
            let actor = ACTORS[*actor];
            compare_batch(
                block(fleet.close_servers(&items, actor)),
                model.close(&items, actor),
            )?;
        }
        Op::Open { ids } => {
            let ids: Vec<String> = ids.iter().map(|id| id.resolve(model)).collect();
            compare_batch(
                block(fleet.open_servers(&open_items(&ids))),
                model.open(&ids),
            )?;
        }
        Op::OpenSized { len } => {
            let ids: Vec<String> = (0..*len).map(sized_id).collect();
            compare_batch(
                block(fleet.open_servers(&open_items(&ids))),
                model.open(&ids),
            )?;
        }
    }
    Ok(())
}

fn open_items(ids: &[String]) -> Vec<OpenItem> {
    ids.iter()
        .map(|id| OpenItem {
            server_id: id.clone(),
            ..Default::default()
        })
        .collect()
}

fn check_state(fleet: &Fleet, model: &Model, page_size: usize) -> TestCaseResult {
    prop_assert_eq!(fleet.len(), model.servers.len(), "server count");
    let expected = model.describe();
    prop_assert_eq!(walk(fleet, page_size, &[])?, expected.clone(), "full walk");
    let closed: Vec<Seen> = expected.into_iter().filter(|s| s.closed).collect();
    prop_assert_eq!(
        walk(
            fleet,
            page_size,
            &[("unavailability-reason", "SERVER_CLOSED")]
        )?,
        closed,
        "walk filtered on SERVER_CLOSED"
    );
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
    fn fleet_matches_reference_model(
        ops in prop::collection::vec(op(), 1..=40),
        page_size in 1..=3usize,
    ) {
        let fleet = Fleet::new(FleetConfig::default()).expect("fleet");
        let mut model = Model::default();
        check_state(&fleet, &model, page_size)?;
        for (step, op) in ops.iter().enumerate() {
            apply(&fleet, &mut model, op)
                .map_err(|e| TestCaseError::fail(format!("step {step} {op:?}: {e}")))?;
            check_state(&fleet, &model, page_size)
                .map_err(|e| TestCaseError::fail(format!("after step {step} {op:?}: {e}")))?;
        }
    }
}
