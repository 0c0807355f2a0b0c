//! The index against the scan it replaces: after every step of random
//! sequences of registrations, heartbeats, placements, agent answers,
//! deletions, closes, deregistrations, sweeps and restarts, the index
//! must equal one rebuilt from the records, and placement must choose
//! exactly what a scan of every server chooses.

use std::{
    collections::{BTreeSet, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use proptest::{prelude::*, test_runner::TestCaseResult};
use tokio::time::Instant;

use super::{Entry, LoadIndex, load_of};
use crate::fleet::{
    CloseItem, CreateSpec, DeleteItem, Fleet, FleetConfig, InstructionKind, InstructionOutcome,
    OpenItem, PlacementStrategy,
    model::{
        Heartbeat, OsFamily, ReportedSession, ServerDescription, ServerId, SessionKind,
        SessionState,
    },
    persist,
    sessions::{self, Order, validate::validate_create},
    state::{Ctx, State},
};

/// Ids whose byte order is not their index order, so that ties are
/// broken by the id and not by when a server registered.
const SERVERS: [&str; 6] = ["s1", "s10", "s0", "t", "s2", "s3"];
const OWNERS: [&str; 2] = ["ann", "bob"];

fn config(placement: PlacementStrategy) -> FleetConfig {
    // Short timeouts, so that a few Advance steps reach unreachable
    // agents, agent timeouts (retries), queue expiry, the end of
    // DELETED retention and removal by sweep.
    FleetConfig {
        unreachable_after: Duration::from_secs(30),
        remove_after: Duration::from_secs(60),
        agent_timeout: Duration::from_secs(10),
        queue_timeout: Duration::from_secs(20),
        deleted_retention: Duration::from_secs(15),
        placement,
        ..FleetConfig::default()
    }
}

/// Server shapes that fill up at different loads, or take consoles
/// only.
fn description(shape: u8) -> ServerDescription {
    let mut d = crate::demo::description(0);
    d.max_concurrent_sessions_per_user = 0;
    match shape % 5 {
        0 => d.max_virtual_sessions = 0,
        1 => d.max_virtual_sessions = 1,
        2 => d.max_virtual_sessions = 3,
        3 => {
            d.max_virtual_sessions = 3;
            d.max_concurrent_sessions_per_user = 1;
        }
        _ => {
            d.host.os.family = OsFamily::Windows;
            d.max_virtual_sessions = 0;
        }
    }
    d
}

fn order(kind: SessionKind, owner: &str, requirements: &str) -> Order {
    validate_create(&CreateSpec {
        name: "probe".into(),
        owner: owner.into(),
        kind: Some(kind),
        requirements: requirements.into(),
        ..CreateSpec::default()
    })
    .expect("a valid probe order")
}

/// Choices drawn from one seed (the demo fleet's SplitMix64), so an
/// operation can pick among whatever the fleet holds when it runs.
struct Picks {
    seed: u64,
    drawn: usize,
}

impl Picks {
    fn new(seed: u64) -> Picks {
        Picks { seed, drawn: 0 }
    }

    fn next(&mut self) -> u64 {
        self.drawn += 1;
        crate::demo::mix(self.drawn, self.seed)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[derive(Debug, Clone, Copy)]
enum Answer {
    Created { ready: bool },
    CreateFailed,
    Deleted,
    DeleteFailed,
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        server: usize,
        shape: u8,
    },
    Heartbeat {
        server: usize,
        seed: u64,
        healthy: bool,
    },
    HeartbeatMany {
        seed: u64,
    },
    Create {
        kind: SessionKind,
        owner: usize,
        enqueue: bool,
        avoid: bool,
    },
    Answer {
        seed: u64,
        answer: Answer,
    },
    Delete {
        seed: u64,
        force: bool,
    },
    Close {
        server: usize,
        force: bool,
    },
    Open {
        server: usize,
    },
    Deregister {
        server: usize,
    },
    Advance {
        secs: u64,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    let server = 0..SERVERS.len();
    let kind = prop_oneof![
        1 => Just(SessionKind::Console),
        4 => Just(SessionKind::Virtual),
    ];
    let answer = prop_oneof![
        any::<bool>().prop_map(|ready| Answer::Created { ready }),
        Just(Answer::CreateFailed),
        Just(Answer::Deleted),
        Just(Answer::DeleteFailed),
    ];
    prop_oneof![
        3 => (server.clone(), any::<u8>()).prop_map(|(server, shape)| Op::Register { server, shape }),
        4 => (server.clone(), any::<u64>(), prop::bool::weighted(0.9))
            .prop_map(|(server, seed, healthy)| Op::Heartbeat { server, seed, healthy }),
        1 => any::<u64>().prop_map(|seed| Op::HeartbeatMany { seed }),
        6 => (kind, 0..OWNERS.len(), any::<bool>(), prop::bool::weighted(0.2))
            .prop_map(|(kind, owner, enqueue, avoid)| Op::Create { kind, owner, enqueue, avoid }),
        3 => (any::<u64>(), answer).prop_map(|(seed, answer)| Op::Answer { seed, answer }),
        2 => (any::<u64>(), any::<bool>()).prop_map(|(seed, force)| Op::Delete { seed, force }),
        1 => (server.clone(), any::<bool>()).prop_map(|(server, force)| Op::Close { server, force }),
        1 => server.clone().prop_map(|server| Op::Open { server }),
        1 => server.prop_map(|server| Op::Deregister { server }),
        1 => (1..40u64).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Restart),
    ]
}

/// What the test remembers besides the fleet: the server ids operations
/// pick from, the sessions it created with their owners, in creation
/// order (session ids are random UUIDs, so picking by id would not
/// repeat from run to run), and adopted ids handed out.
struct Harness {
    servers: Vec<String>,
    sessions: Vec<(String, String)>,
    adopted: usize,
}

impl Harness {
    fn new(servers: Vec<String>) -> Self {
        Harness {
            servers,
            sessions: Vec::new(),
            adopted: 0,
        }
    }

    fn server(&self, i: usize) -> &str {
        &self.servers[i % self.servers.len()]
    }

    fn session(&self, seed: u64) -> Option<(String, String)> {
        if self.sessions.is_empty() {
            return None;
        }
        Some(self.sessions[Picks::new(seed).below(self.sessions.len())].clone())
    }
}

/// A heartbeat for `server` built from what the fleet holds: each
/// placement confirmed or not yet, each reported session kept, deleted
/// or dropped, sometimes a session the broker did not create.
fn report(
    fleet: &Fleet,
    server: &str,
    picks: &mut Picks,
    h: &mut Harness,
    healthy: bool,
) -> Heartbeat {
    let state = fleet.state.read();
    let mut sessions = Vec::new();
    if let Some(record) = state.servers.get(server) {
        for p in &record.placing {
            match picks.below(3) {
                0 => {}
                n => sessions.push(ReportedSession {
                    id: p.session.to_string(),
                    owner: p.owner.clone(),
                    kind: p.kind,
                    state: if n == 1 {
                        SessionState::Creating
                    } else {
                        SessionState::Ready
                    },
                    details: Default::default(),
                }),
            }
        }
        for s in &record.sessions {
            match picks.below(4) {
                0 => {}
                1 => sessions.push(ReportedSession {
                    state: SessionState::Deleted,
                    ..s.clone()
                }),
                _ => sessions.push(s.clone()),
            }
        }
    }
    drop(state);
    if picks.below(4) == 0 {
        h.adopted += 1;
        sessions.push(ReportedSession {
            id: format!("adopted-{}", h.adopted),
            owner: OWNERS[picks.below(OWNERS.len())].into(),
            kind: if picks.below(4) == 0 {
                SessionKind::Console
            } else {
                SessionKind::Virtual
            },
            state: SessionState::Ready,
            details: Default::default(),
        });
    }
    // A report the broker accepts: ids once, one live console at most.
    let mut seen = HashSet::new();
    sessions.retain(|s| seen.insert(s.id.clone()));
    let mut consoles = 0;
    for s in &mut sessions {
        if s.kind == SessionKind::Console && s.state != SessionState::Deleted {
            consoles += 1;
            if consoles > 1 {
                s.state = SessionState::Deleted;
            }
        }
    }
    Heartbeat {
        dcv_server_healthy: healthy,
        sessions,
        ..Heartbeat::default()
    }
}

/// The fleet after a restart from what it would have stored.
fn restarted(fleet: &Fleet) -> Fleet {
    let now = Instant::now();
    let wall = SystemTime::now();
    let snapshot = {
        let state = fleet.state.read();
        persist::Snapshot {
            servers: state
                .servers
                .values()
                .map(|s| persist::stored_server(s))
                .collect(),
            sessions: state
                .sessions
                .records
                .values()
                .map(|r| sessions::stored_session(r, now, wall))
                .collect(),
            ..persist::Snapshot::default()
        }
    };
    Fleet::restore(
        fleet.config().clone(),
        Arc::new(persist::MemoryStore),
        snapshot,
    )
    .expect("a restored fleet")
}

async fn apply(fleet: &mut Fleet, h: &mut Harness, op: &Op) {
    // Outcomes are not checked here (other tests do): only what each
    // step leaves behind.
    match *op {
        Op::Register { server, shape } => {
            let _ = fleet.register_nowait(h.server(server), description(shape));
        }
        Op::Heartbeat {
            server,
            seed,
            healthy,
        } => {
            let id = h.server(server).to_string();
            let report = report(fleet, &id, &mut Picks::new(seed), h, healthy);
            let _ = fleet.heartbeat(&id, report);
        }
        Op::HeartbeatMany { seed } => {
            let mut picks = Picks::new(seed);
            let mut reports = Vec::new();
            for id in h.servers.clone() {
                if picks.below(2) == 0 {
                    let report = report(fleet, &id, &mut picks, h, true);
                    reports.push((ServerId::from(id), report));
                }
            }
            fleet.heartbeat_many(reports);
        }
        Op::Create {
            kind,
            owner,
            enqueue,
            avoid,
        } => {
            let spec = CreateSpec {
                name: "s".into(),
                owner: OWNERS[owner].into(),
                kind: Some(kind),
                enqueue,
                requirements: if avoid {
                    "server:Id != 's0'".into()
                } else {
                    String::new()
                },
                ..CreateSpec::default()
            };
            let mut created = Vec::new();
            let _ = fleet
                .create_sessions(&[spec], |_, view| created.push(view.record.id.to_string()))
                .await;
            h.sessions.extend(
                created
                    .into_iter()
                    .map(|id| (id, OWNERS[owner].to_string())),
            );
        }
        Op::Answer { seed, answer } => {
            let Some((session, _)) = h.session(seed) else {
                return;
            };
            let server = fleet
                .state
                .read()
                .sessions
                .records
                .get(session.as_str())
                .and_then(|r| r.server.as_ref().map(ToString::to_string));
            let Some(server) = server else {
                return;
            };
            let (kind, outcome) = match answer {
                Answer::Created { ready } => {
                    (InstructionKind::Create, InstructionOutcome::Done { ready })
                }
                Answer::CreateFailed => (
                    InstructionKind::Create,
                    InstructionOutcome::Failed("no".into()),
                ),
                Answer::Deleted => (
                    InstructionKind::Delete,
                    InstructionOutcome::Done { ready: false },
                ),
                Answer::DeleteFailed => (
                    InstructionKind::Delete,
                    InstructionOutcome::Failed("no".into()),
                ),
            };
            let _ = fleet.report_instruction(&server, &session, kind, outcome);
        }
        Op::Delete { seed, force } => {
            let Some((session_id, owner)) = h.session(seed) else {
                return;
            };
            let item = DeleteItem {
                session_id,
                owner,
                force,
            };
            let _ = fleet.delete_sessions(&[item]).await;
        }
        Op::Close { server, force } => {
            let item = CloseItem {
                server_id: h.server(server).into(),
                force,
                ..Default::default()
            };
            let _ = fleet.close_servers(&[item], "tester").await;
        }
        Op::Open { server } => {
            let _ = fleet
                .open_servers(&[OpenItem {
                    server_id: h.server(server).to_string(),
                    ..Default::default()
                }])
                .await;
        }
        Op::Deregister { server } => {
            let _ = fleet.deregister(h.server(server)).await;
        }
        Op::Advance { secs } => {
            tokio::time::advance(Duration::from_secs(secs)).await;
            fleet.sweep();
        }
        Op::Restart => *fleet = restarted(fleet),
    }
}

/// The index as it should be, rebuilt from the records.
fn rebuilt(state: &State) -> BTreeSet<Entry> {
    state
        .servers
        .values()
        .map(|s| (load_of(s), s.id.clone()))
        .collect()
}

/// The index equals its rebuild, and placement by the index chooses
/// what the scan chooses, for both strategies, several orders, and
/// with servers excluded (as a retry excludes those tried).
fn check(fleet: &Fleet) -> TestCaseResult {
    let state = fleet.state.read();
    prop_assert_eq!(state.by_load.entries(), &rebuilt(&state));
    let now = Instant::now();
    let probes = [
        order(SessionKind::Console, "ann", ""),
        order(SessionKind::Virtual, "ann", ""),
        order(SessionKind::Virtual, "bob", ""),
        order(SessionKind::Virtual, "ann", "server:Id != 's1'"),
    ];
    for placement in [PlacementStrategy::Spread, PlacementStrategy::Pack] {
        let config = FleetConfig {
            placement,
            ..fleet.config().clone()
        };
        let ctx = Ctx {
            config: &config,
            events: Some(&fleet.events),
            evaluation_budget: std::cell::Cell::new(u64::MAX),
        };
        for probe in &probes {
            let first = state.choose_server_by_scan(probe, &[], now, &ctx);
            prop_assert_eq!(
                &state.choose_server(probe, &[], now, &ctx),
                &first,
                "{:?} {:?}",
                placement,
                probe.kind
            );
            let mut exclude: Vec<ServerId> = first.into_iter().collect();
            exclude.push(ServerId::from("s10"));
            prop_assert_eq!(
                state.choose_server(probe, &exclude, now, &ctx),
                state.choose_server_by_scan(probe, &exclude, now, &ctx),
                "{:?} {:?} excluding {:?}",
                placement,
                probe.kind,
                exclude
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        // A failure prints its shrunk case; nothing is written beside
        // the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn placement_by_index_matches_a_scan(
        pack in any::<bool>(),
        ops in prop::collection::vec(op(), 1..=80),
    ) {
        let placement = if pack { PlacementStrategy::Pack } else { PlacementStrategy::Spread };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime");
        runtime.block_on(async {
            let mut fleet = Fleet::new(config(placement)).expect("a fleet");
            let mut harness = Harness::new(SERVERS.map(String::from).to_vec());
            for (step, op) in ops.iter().enumerate() {
                apply(&mut fleet, &mut harness, op).await;
                check(&fleet).map_err(|e| {
                    TestCaseError::fail(format!("after step {step} {op:?}: {e}"))
                })?;
            }
            Ok::<(), TestCaseError>(())
        })?;
    }
}

#[test]
fn pack_breaks_ties_by_ascending_id() {
    let mut index = LoadIndex::default();
    for (load, id) in [
        (0, "a"),
        (2, "c"),
        (2, "b"),
        (5, "z"),
        (0, "b"),
        (2, "d"),
        (5, "y"),
    ] {
        index.insert(load, ServerId::from(id));
    }
    let order = |it: Vec<&Entry>| -> Vec<String> {
        it.into_iter().map(|(l, id)| format!("{l}{id}")).collect()
    };
    assert_eq!(
        order(index.most_loaded_first().collect()),
        ["5y", "5z", "2b", "2c", "2d", "0a", "0b"]
    );
    assert_eq!(
        order(index.least_loaded_first().collect()),
        ["0a", "0b", "2b", "2c", "2d", "5y", "5z"]
    );
    index.moved(&ServerId::from("c"), 2, 7);
    index.moved(&ServerId::from("y"), 5, 0);
    index.remove(0, &ServerId::from("a"));
    assert_eq!(
        order(index.most_loaded_first().collect()),
        ["7c", "5z", "2b", "2d", "0b", "0y"]
    );
}
/// Deeper trees and longer runs of equal loads than the property test
/// reaches: 600 servers, checked every 50 steps of 1,500.
#[test]
fn a_large_fleet_places_like_a_scan() {
    for placement in [PlacementStrategy::Spread, PlacementStrategy::Pack] {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a current-thread runtime");
        runtime.block_on(async {
            let mut fleet = Fleet::new(config(placement)).expect("a fleet");
            // 7 and 600 are coprime: every id once, not in index order.
            let ids = (0..600)
                .map(|i| format!("srv-{:03}", i * 7 % 600))
                .collect();
            let mut h = Harness::new(ids);
            for i in 0..600 {
                let id = h.server(i).to_string();
                let (_, durable) = fleet
                    .register_nowait(&id, description(i as u8))
                    .expect("registered");
                durable.wait().await.expect("kept in memory");
            }
            let mut picks = Picks::new(placement as u64);
            for step in 0..1500 {
                let (server, seed) = (picks.below(600), picks.next());
                let op = match picks.below(12) {
                    0..=4 => Op::Create {
                        kind: if picks.below(6) == 0 {
                            SessionKind::Console
                        } else {
                            SessionKind::Virtual
                        },
                        owner: picks.below(OWNERS.len()),
                        enqueue: false,
                        avoid: picks.below(5) == 0,
                    },
                    5 | 6 => Op::Heartbeat {
                        server,
                        seed,
                        healthy: true,
                    },
                    7 => Op::Answer {
                        seed,
                        answer: Answer::Created { ready: true },
                    },
                    8 => Op::Delete { seed, force: false },
                    9 => Op::Deregister { server },
                    10 => Op::Register {
                        server,
                        shape: picks.below(5) as u8,
                    },
                    _ => Op::Close {
                        server,
                        force: true,
                    },
                };
                apply(&mut fleet, &mut h, &op).await;
                if step % 50 == 0
                    && let Err(e) = check(&fleet)
                {
                    panic!("{placement:?} after step {step} {op:?}: {e}");
                }
            }
            if let Err(e) = check(&fleet) {
                panic!("{placement:?} at the end: {e}");
            }
        });
    }
}
