//! Replicas of the fleet, in process (no database): a follower that applies
//! a leader's submissions shows what the leader shows, a reload from what a
//! store would hold shows it too, a follower runs no maintenance of its
//! own, a reload keeps an agent's instruction stream, and a revocation
//! applied on a follower ends that client's authentication at once.
//!
//! The leader's store captures every submission, as the change log would;
//! the follower applies each with `Fleet::apply_replicated`. A model store
//! folds the same submissions into the tables a database would hold, for
//! `Fleet::reload`. Time is tokio's paused clock, shared by every fleet.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use dcv_broker::{
    auth::{Auth, AuthConfig, Scope, ScopeSet},
    fleet::{
        CloseItem, CreateSpec, DeleteItem, DescribeQuery, Fleet, FleetConfig, Heartbeat,
        Instruction, InstructionKind, InstructionOutcome, OpenItem, OsFamily, ReportedDetails,
        ReportedSession, SessionKind, SessionQuery, SessionState,
        persist::{Change, Durable, Snapshot, Store, StoredLiveness},
        watch::{Change as WatchChange, ServerSnapshot, WatchNext, WatchStart, Watched, Watcher},
        watch_sessions::SessionSnapshot,
    },
    pb, sample, wire,
};
use tokio::sync::mpsc;

/// Records every submission, in order; durable at once.
#[derive(Debug, Default)]
struct Capture {
    log: Mutex<Vec<Vec<Change>>>,
}

impl Store for Capture {
    fn submit(&self, changes: Vec<Change>) -> Durable {
        self.log.lock().unwrap().push(changes);
        Durable::done()
    }

    fn keeps_liveness(&self) -> bool {
        true
    }
}

impl Capture {
    fn take(&self) -> Vec<Vec<Change>> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

/// What a database would hold after the submissions folded into it, plus
/// the latest liveness of each server (what the change log passes on).
#[derive(Debug, Default, Clone)]
struct Tables {
    servers: BTreeMap<String, dcv_broker::fleet::persist::StoredServer>,
    sessions: BTreeMap<String, dcv_broker::fleet::persist::StoredSession>,
    clients: BTreeMap<String, dcv_broker::fleet::persist::StoredClient>,
    secrets: BTreeMap<String, Vec<u8>>,
    liveness: BTreeMap<String, StoredLiveness>,
}

impl Tables {
    fn fold(&mut self, changes: &[Change]) {
        for change in changes {
            match change {
                Change::PutServer(s) => {
                    self.servers.insert(s.id.clone(), s.clone());
                }
                Change::PutServerState {
                    id,
                    holds,
                    state_version,
                    agent_departed,
                } => {
                    let s = self.servers.get_mut(id).expect("state of a stored server");
                    s.holds.clone_from(holds);
                    s.state_version = *state_version;
                    s.agent_departed = *agent_departed;
                }
                Change::DeleteServer(id) => {
                    self.servers.remove(id);
                    self.liveness.remove(id);
                }
                Change::PutSession(s) => {
                    self.sessions.insert(s.id.clone(), s.clone());
                }
                Change::DeleteSession(id) => {
                    self.sessions.remove(id);
                }
                Change::PutClient(c) => {
                    self.clients.insert(c.id.clone(), c.clone());
                }
                Change::PutSecret { name, value } => {
                    self.secrets.insert(name.clone(), value.clone());
                }
                Change::PutLiveness(l) => {
                    self.liveness.insert(l.id.clone(), l.clone());
                }
                // The audit log and ClientToken records are not
                // replicated state.
                Change::PutAudit(_)
                | Change::PruneAudit { .. }
                | Change::PutClientToken(_)
                | Change::PruneClientTokens { .. } => {}
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            servers: self.servers.values().cloned().collect(),
            sessions: self.sessions.values().cloned().collect(),
            clients: self.clients.values().cloned().collect(),
            secrets: self
                .secrets
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            client_tokens: Vec::new(),
        }
    }

    fn liveness(&self) -> Vec<Change> {
        self.liveness
            .values()
            .cloned()
            .map(Change::PutLiveness)
            .collect()
    }
}

/// The secrets every replica finds in the database (contract item 6).
fn shared_secrets() -> Vec<(String, Vec<u8>)> {
    vec![
        ("page-token-key/hmac-sha256".into(), vec![1; 32]),
        ("connection-token-key/hmac-sha256".into(), vec![2; 32]),
        ("token-signing-key/hs256".into(), vec![3; 32]),
    ]
}

fn config() -> FleetConfig {
    FleetConfig {
        unreachable_after: Duration::from_secs(60),
        remove_after: Duration::from_secs(200),
        agent_timeout: Duration::from_secs(20),
        queue_timeout: Duration::from_secs(120),
        deleted_retention: Duration::from_secs(100),
        queue_max_size: 20,
        ..FleetConfig::default()
    }
}

/// Every server, every field, through every page.
fn servers(fleet: &Fleet) -> Vec<pb::Server> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let query = DescribeQuery {
            max_results: Some(2),
            next_token: token,
            ..DescribeQuery::default()
        };
        let next = fleet
            .describe_servers(&query, |v| out.push(wire::server_to_pb(v)))
            .unwrap();
        match next {
            Some(next) => token = next,
            None => return out,
        }
    }
}

/// Every session, every field, through every page.
fn sessions(fleet: &Fleet) -> Vec<pb::Session> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let query = SessionQuery {
            max_results: Some(3),
            next_token: token,
            ..SessionQuery::default()
        };
        let next = fleet
            .describe_sessions(&query, |v| out.push(wire::session_to_pb(v)))
            .unwrap();
        match next {
            Some(next) => token = next,
            None => return out,
        }
    }
}

/// What a describe shows that a reload (followed by each server's latest
/// heartbeat) can know. A reload gives every server a fresh heartbeat
/// window (as a restart does), so whether an agent counts as unreachable
/// by silence is not comparable; and a session's connections are what its
/// agent said at some heartbeat, which the leader may have reset since (a
/// new placement) without a heartbeat: the latest heartbeat replayed after
/// a reload cannot be ordered against that, so they are not compared here
/// (the follower's comparison, which sees every change in order, checks
/// them exactly).
fn as_a_reload_knows(
    (mut servers, mut sessions): (Vec<pb::Server>, Vec<pb::Session>),
) -> (Vec<pb::Server>, Vec<pb::Session>) {
    let unreachable = pb::UnavailabilityReason::UnreachableAgent as i32;
    for s in &mut servers {
        s.unavailability_reasons.retain(|r| *r != unreachable);
        s.unavailability_reason = s
            .unavailability_reasons
            .first()
            .copied()
            .unwrap_or(pb::UnavailabilityReason::Unspecified as i32);
        s.availability = if s.unavailability_reasons.is_empty() {
            pb::Availability::Available
        } else {
            pb::Availability::Unavailable
        } as i32;
    }
    for s in &mut sessions {
        s.num_of_connections = 0;
        s.last_disconnection_time = None;
        if s.state == pb::SessionState::Unknown as i32 {
            s.state = if s.substate == pb::SessionSubstate::Unspecified as i32 {
                pb::SessionState::Ready
            } else {
                pb::SessionState::Creating
            } as i32;
        }
    }
    (servers, sessions)
}

fn describe(fleet: &Fleet) -> (Vec<pb::Server>, Vec<pb::Session>) {
    (servers(fleet), sessions(fleet))
}

/// A watcher in process (of servers or of sessions) and its view, each
/// object as `render` shows it.
struct Seen<K: Watched, P> {
    watcher: Watcher<K>,
    view: BTreeMap<String, P>,
    render: fn(&K::Snapshot) -> (String, P),
}

impl<K: Watched, P> Seen<K, P> {
    fn new(
        (watcher, start): (Watcher<K>, WatchStart<K>),
        render: fn(&K::Snapshot) -> (String, P),
    ) -> Self {
        let WatchStart::Snapshot { items } = start else {
            panic!("a new watch starts with a snapshot");
        };
        let view = items.iter().map(|s| render(s)).collect();
        Seen {
            watcher,
            view,
            render,
        }
    }

    /// Takes every change published so far (the clock is paused: the
    /// progress mark comes as soon as nothing is left).
    async fn catch_up(&mut self) {
        loop {
            match self.watcher.next(Duration::from_millis(1)).await.unwrap() {
                WatchNext::Progress { .. } => return,
                WatchNext::Changes { changes, .. } => {
                    for (_, change) in changes {
                        match change {
                            WatchChange::Added(s) | WatchChange::Modified(s) => {
                                let (id, shown) = (self.render)(&s);
                                self.view.insert(id, shown);
                            }
                            WatchChange::Removed(s) => {
                                let (id, _) = (self.render)(&s);
                                self.view.remove(&id);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn server_shown(s: &ServerSnapshot) -> (String, pb::Server) {
    (s.record.id.to_string(), wire::server_to_pb(s.view()))
}

fn session_shown(s: &SessionSnapshot) -> (String, pb::Session) {
    (s.record.id.to_string(), wire::session_to_pb(s.view()))
}

/// What a watcher's view and a describe must agree on (a watched state's
/// host metrics and heartbeat time are as of its change).
fn essentials(servers: impl IntoIterator<Item = pb::Server>) -> Vec<String> {
    servers
        .into_iter()
        .map(|s| {
            format!(
                "{} {:?} {:?} {:?} v{} c{} v{} {:?}",
                s.id,
                s.availability(),
                s.unavailability_reasons,
                s.holds,
                s.state_version,
                s.console_session_count,
                s.virtual_session_count,
                s.tags,
            )
        })
        .collect()
}

/// A reproducible stream of numbers (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const SERVERS: usize = 5;

fn server_id(i: usize) -> String {
    format!("srv-{i}")
}

/// One simulated agent: the sessions it runs and the instructions it has
/// not answered yet.
#[derive(Default)]
struct Agent {
    stream: Option<mpsc::UnboundedReceiver<Instruction>>,
    running: BTreeMap<String, (SessionKind, String, SessionState)>,
    creates: BTreeMap<String, (SessionKind, String)>,
    deletes: BTreeSet<String>,
}

impl Agent {
    fn drain(&mut self) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        while let Ok(instruction) = stream.try_recv() {
            match instruction {
                Instruction::Create { session, order, .. } => {
                    self.creates
                        .insert(session.to_string(), (order.kind, order.owner.clone()));
                }
                Instruction::Delete { session, .. } => {
                    self.deletes.insert(session.to_string());
                }
                _ => {}
            }
        }
    }
}

fn description(i: usize) -> dcv_broker::fleet::ServerDescription {
    let mut d = sample::description(i);
    d.host.os.family = OsFamily::Linux;
    d.max_virtual_sessions = 2 + (i as u32 % 2);
    d
}

fn pick<T: Clone>(rng: &mut Rng, items: &[T]) -> Option<T> {
    (!items.is_empty()).then(|| items[rng.below(items.len() as u64) as usize].clone())
}

/// One random step on the leader, as operators and agents would cause it.
async fn step(rng: &mut Rng, leader: &Fleet, agents: &mut [Agent]) -> String {
    let i = rng.below(SERVERS as u64) as usize;
    let id = server_id(i);
    let agent = &mut agents[i];
    match rng.below(15) {
        0 | 1 => {
            let _ = leader.register(&id, description(i)).await.unwrap();
            agent.stream = Some(leader.subscribe_instructions(&id).unwrap());
            format!("register {id}")
        }
        2..=4 => {
            let sessions = agent
                .running
                .iter()
                .map(|(sid, (kind, owner, state))| ReportedSession {
                    id: sid.clone(),
                    owner: owner.clone(),
                    kind: *kind,
                    state: *state,
                    details: ReportedDetails {
                        connections: rng.below(3) as u32,
                        last_disconnection: rng
                            .chance(50)
                            .then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
                        created_at: None,
                        name: String::new(),
                    },
                })
                .collect();
            let load = rng.below(400) as f32 / 100.0;
            let report = Heartbeat {
                dcv_server_healthy: !rng.chance(10),
                logged_in_users: if rng.chance(20) {
                    vec!["someone".into()]
                } else {
                    Vec::new()
                },
                sessions,
                cpu_load_average: Some(dcv_broker::fleet::LoadAverage {
                    one_minute: load,
                    five_minutes: load,
                    fifteen_minutes: load,
                }),
                memory: None,
                swap: None,
            };
            let r = leader.heartbeat(&id, report);
            format!("heartbeat {id}: {}", r.is_ok())
        }
        5 => {
            let items: Vec<CloseItem> = (0..=rng.below(2))
                .map(|_| CloseItem {
                    server_id: server_id(rng.below(SERVERS as u64) as usize),
                    force: rng.chance(50),
                    reason: "maintenance".into(),
                    ..Default::default()
                })
                .collect();
            let r = leader.close_servers(&items, "ops").await.unwrap();
            format!("close {items:?}: {r:?}")
        }
        6 => {
            let ids: Vec<OpenItem> = (0..=rng.below(2))
                .map(|_| OpenItem {
                    server_id: server_id(rng.below(SERVERS as u64) as usize),
                    ..Default::default()
                })
                .collect();
            let r = leader.open_servers(&ids).await.unwrap();
            format!("open {ids:?}: {r:?}")
        }
        7 | 8 => {
            let specs: Vec<CreateSpec> = (0..=rng.below(2))
                .map(|n| CreateSpec {
                    name: format!("s{n}"),
                    owner: format!("user{}", rng.below(3)),
                    kind: Some(SessionKind::Virtual),
                    enqueue: rng.chance(60),
                    disable_retry: rng.chance(20),
                    ..CreateSpec::default()
                })
                .collect();
            let r = leader.create_sessions(&specs, |_, _| {}).await.unwrap();
            format!("create {}: {r:?}", specs.len())
        }
        9 => {
            agent.drain();
            let Some((sid, (kind, owner))) = agent.creates.pop_first() else {
                return "nothing to confirm".into();
            };
            let ready = rng.chance(70);
            if rng.chance(75) {
                let state = if ready {
                    SessionState::Ready
                } else {
                    SessionState::Creating
                };
                agent.running.insert(sid.clone(), (kind, owner, state));
                let r = leader.report_instruction(
                    &id,
                    &sid,
                    InstructionKind::Create,
                    InstructionOutcome::Done { ready },
                );
                format!("{id} created {sid}: {r:?}")
            } else {
                let r = leader.report_instruction(
                    &id,
                    &sid,
                    InstructionKind::Create,
                    InstructionOutcome::Failed("no room".into()),
                );
                format!("{id} failed to create {sid}: {r:?}")
            }
        }
        10 => {
            agent.drain();
            let Some(sid) = agent.deletes.pop_first() else {
                return "nothing to delete".into();
            };
            if rng.chance(80) {
                agent.running.remove(&sid);
                let r = leader.report_instruction(
                    &id,
                    &sid,
                    InstructionKind::Delete,
                    InstructionOutcome::Done { ready: false },
                );
                format!("{id} deleted {sid}: {r:?}")
            } else {
                let r = leader.report_instruction(
                    &id,
                    &sid,
                    InstructionKind::Delete,
                    InstructionOutcome::Failed("busy".into()),
                );
                format!("{id} failed to delete {sid}: {r:?}")
            }
        }
        11 => {
            let all = sessions(leader);
            let Some(s) = pick(rng, &all) else {
                return "no session to delete".into();
            };
            let items = [DeleteItem {
                session_id: s.id.clone(),
                owner: s.owner.clone(),
                force: rng.chance(30),
            }];
            let r = leader.delete_sessions(&items).await.unwrap();
            format!("delete {items:?}: {r:?}")
        }
        12 => {
            let r = leader.deregister(&id).await;
            if matches!(r, Ok(true)) {
                *agent = Agent::default();
            }
            format!("deregister {id}: {r:?}")
        }
        13 => {
            // The agent loses a session (or reports it deleted).
            let running: Vec<String> = agent.running.keys().cloned().collect();
            let Some(sid) = pick(rng, &running) else {
                return "nothing running".into();
            };
            if rng.chance(50) {
                agent.running.remove(&sid);
            } else if let Some(s) = agent.running.get_mut(&sid) {
                s.2 = SessionState::Deleted;
            }
            format!("{id} lost {sid}")
        }
        _ => {
            let removed = leader.sweep();
            format!("swept {removed:?}")
        }
    }
}

/// Time passes (as far as tokio's paused clock is concerned) and the
/// leader sweeps.
async fn later(rng: &mut Rng, leader: &Fleet) -> String {
    let secs = 1 + rng.below(45);
    tokio::time::advance(Duration::from_secs(secs)).await;
    let removed = leader.sweep();
    format!("{secs} s later, swept {removed:?}")
}

/// What a follower tailing the change log gets for a group of
/// submissions committed together: the current rows of every id they
/// touched (in an order of the log's choosing: sessions first, to show
/// the order does not matter), then their heartbeats in order.
fn as_the_log_batches_them(group: &[Vec<Change>], tables: &Tables) -> Vec<Change> {
    let mut servers = BTreeSet::new();
    let mut sessions = BTreeSet::new();
    let mut liveness = Vec::new();
    for change in group.iter().flatten() {
        match change {
            Change::PutServer(s) => {
                servers.insert(s.id.clone());
            }
            Change::PutServerState { id, .. } | Change::DeleteServer(id) => {
                servers.insert(id.clone());
            }
            Change::PutSession(s) => {
                sessions.insert(s.id.clone());
            }
            Change::DeleteSession(id) => {
                sessions.insert(id.clone());
            }
            Change::PutLiveness(l) => liveness.push(Change::PutLiveness(l.clone())),
            Change::PutClient(_)
            | Change::PutSecret { .. }
            | Change::PutAudit(_)
            | Change::PruneAudit { .. }
            | Change::PutClientToken(_)
            | Change::PruneClientTokens { .. } => {}
        }
    }
    let mut batch: Vec<Change> = sessions
        .into_iter()
        .map(|id| match tables.sessions.get(&id) {
            Some(s) => Change::PutSession(s.clone()),
            None => Change::DeleteSession(id),
        })
        .collect();
    batch.extend(servers.into_iter().map(|id| match tables.servers.get(&id) {
        Some(s) => Change::PutServer(s.clone()),
        None => Change::DeleteServer(id),
    }));
    batch.extend(liveness);
    batch
}

async fn replay(seed: u64, steps: usize) {
    let start = Snapshot {
        secrets: shared_secrets(),
        ..Snapshot::default()
    };
    let capture = Arc::new(Capture::default());
    let leader = Fleet::restore(config(), capture.clone(), start.clone()).unwrap();
    let follower_store = Arc::new(Capture::default());
    let follower = Fleet::restore(config(), follower_store.clone(), start.clone()).unwrap();
    follower.set_writable(false);
    let reloaded = Fleet::restore(config(), Arc::new(Capture::default()), start.clone()).unwrap();
    reloaded.set_writable(false);
    assert!(capture.take().is_empty(), "the secrets were there already");

    let mut tables = Tables::default();
    tables.fold(
        &start
            .secrets
            .iter()
            .map(|(name, value)| Change::PutSecret {
                name: name.clone(),
                value: value.clone(),
            })
            .collect::<Vec<_>>(),
    );
    let mut agents: Vec<Agent> = (0..SERVERS).map(|_| Agent::default()).collect();
    let mut rng = Rng(seed);
    let mut history = Vec::new();
    let mut liveness_seen = 0;
    // A second follower takes groups of submissions as the change log
    // batches them (a group commit, or a follower catching up).
    let batched = Fleet::restore(config(), Arc::new(Capture::default()), start.clone()).unwrap();
    batched.set_writable(false);
    let mut group = Vec::new();
    let mut group_ends = 1 + rng.below(4) as usize;
    let mut leader_watch = Seen::new(leader.watch_servers(&[], None).unwrap(), server_shown);
    let mut follower_watch = Seen::new(follower.watch_servers(&[], None).unwrap(), server_shown);
    let mut batched_watch = Seen::new(batched.watch_servers(&[], None).unwrap(), server_shown);
    let mut leader_sessions = Seen::new(leader.watch_sessions(&[], None).unwrap(), session_shown);
    let mut follower_sessions =
        Seen::new(follower.watch_sessions(&[], None).unwrap(), session_shown);
    let mut batched_sessions = Seen::new(batched.watch_sessions(&[], None).unwrap(), session_shown);
    for n in 0..steps {
        // A group commit spans no time: the batch goes out before time
        // passes (a follower's heartbeat ages count from when it applied
        // them, so a batch held back across an advance would lag by it).
        let advance = rng.chance(8);
        if advance && !group.is_empty() {
            let batch = as_the_log_batches_them(&std::mem::take(&mut group), &tables);
            batched.apply_replicated(&batch).unwrap();
            assert_eq!(
                describe(&batched),
                describe(&leader),
                "seed {seed}, before step {n}: the batched follower differs; steps:\n{}",
                history.join("\n"),
            );
        }
        let what = if advance {
            later(&mut rng, &leader).await
        } else {
            step(&mut rng, &leader, &mut agents).await
        };
        history.push(what);
        // Described before the submissions are taken: a read on the leader
        // first does whatever maintenance is due (a server reopened past
        // its removal deadline goes), and that is submitted too.
        let expected = describe(&leader);
        for submission in capture.take() {
            liveness_seen += submission
                .iter()
                .filter(|c| matches!(c, Change::PutLiveness(_)))
                .count();
            follower.apply_replicated(&submission).unwrap();
            tables.fold(&submission);
            group.push(submission);
        }
        if n + 1 >= group_ends || n + 1 == steps {
            let batch = as_the_log_batches_them(&std::mem::take(&mut group), &tables);
            batched.apply_replicated(&batch).unwrap();
            group_ends = n + 1 + 1 + rng.below(4) as usize;
            assert_eq!(
                describe(&batched),
                expected,
                "seed {seed}, step {n}: the batched follower differs; steps:\n{}\nleader:\n{}follower:\n{}",
                history.join("\n"),
                leader.occupancy_report(),
                batched.occupancy_report()
            );
        }
        let got = describe(&follower);
        assert_eq!(
            got,
            expected,
            "seed {seed}, step {n}: the follower differs; steps:\n{}\nleader:\n{}follower:\n{}",
            history.join("\n"),
            leader.occupancy_report(),
            follower.occupancy_report()
        );
        if n % 3 == 0 || n + 1 == steps {
            reloaded.reload(&tables.snapshot()).unwrap();
            reloaded.apply_replicated(&tables.liveness()).unwrap();
            assert_eq!(
                as_a_reload_knows(describe(&reloaded)),
                as_a_reload_knows(expected),
                "seed {seed}, step {n}: the reloaded fleet differs; steps:\n{}",
                history.join("\n")
            );
        }
    }
    // Each replica's watcher, having seen every change its replica
    // published, shows what that replica describes.
    for (name, fleet, watcher) in [
        ("leader", &leader, &mut leader_watch),
        ("follower", &follower, &mut follower_watch),
        ("batched follower", &batched, &mut batched_watch),
    ] {
        // A follower notes silences for its watchers on its sweep.
        fleet.sweep();
        let described = servers(fleet);
        watcher.catch_up().await;
        assert_eq!(
            essentials(watcher.view.values().cloned()),
            essentials(described),
            "seed {seed}: the {name}'s watcher differs; steps:\n{}",
            history.join("\n")
        );
    }
    // Likewise each replica's session watcher, field for field.
    for (name, fleet, watcher) in [
        ("leader", &leader, &mut leader_sessions),
        ("follower", &follower, &mut follower_sessions),
        ("batched follower", &batched, &mut batched_sessions),
    ] {
        let described: BTreeMap<String, pb::Session> = sessions(fleet)
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        watcher.catch_up().await;
        assert_eq!(
            watcher.view,
            described,
            "seed {seed}: the {name}'s session watcher differs; steps:\n{}",
            history.join("\n")
        );
    }
    assert!(liveness_seen > 0, "heartbeats were passed on");
    assert!(
        follower_store.take().is_empty(),
        "a follower submits nothing"
    );
    // Another replica's page tokens are good here: the key is shared.
    let mut first = None;
    let next = leader
        .describe_servers(
            &DescribeQuery {
                max_results: Some(1),
                ..DescribeQuery::default()
            },
            |v| first = Some(v.record.id.to_string()),
        )
        .unwrap();
    if let Some(token) = next {
        let mut second = Vec::new();
        follower
            .describe_servers(
                &DescribeQuery {
                    max_results: Some(1),
                    next_token: token,
                    ..DescribeQuery::default()
                },
                |v| second.push(v.record.id.to_string()),
            )
            .unwrap();
        assert_eq!(second.len(), 1);
        assert!(first.unwrap() < second[0]);
    }
}

#[tokio::test(start_paused = true)]
async fn a_follower_applying_the_leaders_submissions_describes_what_the_leader_does() {
    for seed in [
        0x9e37_79b9_7f4a_7c15,
        0x2545_f491_4f6c_dd1d,
        7,
        1_234_567,
        0xdead_beef,
        42,
    ] {
        replay(seed, 400).await;
    }
}

/// A leader and a follower built from the same snapshot, the follower
/// taking the leader's submissions as `sync` applies them.
fn pair() -> (Fleet, Arc<Capture>, Fleet, Arc<Capture>) {
    let start = Snapshot {
        secrets: shared_secrets(),
        ..Snapshot::default()
    };
    let capture = Arc::new(Capture::default());
    let leader = Fleet::restore(config(), capture.clone(), start.clone()).unwrap();
    let follower_store = Arc::new(Capture::default());
    let follower = Fleet::restore(config(), follower_store.clone(), start).unwrap();
    follower.set_writable(false);
    (leader, capture, follower, follower_store)
}

fn sync(capture: &Capture, follower: &Fleet) {
    for submission in capture.take() {
        follower.apply_replicated(&submission).unwrap();
    }
}

fn one_session(fleet: &Fleet) -> pb::Session {
    let all = sessions(fleet);
    assert_eq!(all.len(), 1, "{all:?}");
    all.into_iter().next().unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_follower_runs_no_maintenance_until_the_leaders_change_arrives() {
    let (leader, capture, follower, follower_store) = pair();
    leader.register("srv-0", description(0)).await.unwrap();
    let placed = leader
        .create_sessions(
            &[CreateSpec {
                name: "s".into(),
                owner: "u".into(),
                kind: Some(SessionKind::Virtual),
                ..CreateSpec::default()
            }],
            |_, _| {},
        )
        .await
        .unwrap();
    assert!(placed[0].is_ok());
    sync(&capture, &follower);
    let placing = one_session(&follower);
    assert_eq!(placing.state, pb::SessionState::Creating as i32);
    assert_eq!(placing.server.as_ref().unwrap().id, "srv-0");

    // Past the agent's deadline: the follower's reads and sweeps leave
    // the session as it is; only the leader's change moves it.
    tokio::time::advance(config().agent_timeout + Duration::from_secs(1)).await;
    assert!(follower.sweep().is_empty());
    assert_eq!(one_session(&follower), placing);
    assert!(leader.sweep().is_empty());
    sync(&capture, &follower);
    let failed = one_session(&follower);
    assert_eq!(failed.state, pb::SessionState::Deleted as i32);
    assert_eq!(failed, one_session(&leader));

    // Past the removal timeout and the deleted session's retention: the
    // silent server and the session stay on the follower until the
    // leader forgets them.
    tokio::time::advance(config().remove_after + Duration::from_secs(1)).await;
    assert!(follower.sweep().is_empty());
    assert_eq!(servers(&follower).len(), 1);
    assert_eq!(one_session(&follower), failed);
    assert_eq!(leader.sweep(), vec![Arc::from("srv-0")]);
    sync(&capture, &follower);
    assert!(servers(&follower).is_empty());
    assert!(sessions(&follower).is_empty());
    assert_eq!(describe(&follower), describe(&leader));
    assert!(
        follower_store.take().is_empty(),
        "a follower submits nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_write_on_a_follower_is_not_acknowledged_as_durable() {
    let (_, _, follower, follower_store) = pair();
    let err = follower
        .register("srv-0", description(0))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not the leader"), "{err}");
    assert!(follower_store.take().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_an_agents_instruction_stream_and_drops_what_was_never_committed() {
    let capture = Arc::new(Capture::default());
    let start = Snapshot {
        secrets: shared_secrets(),
        ..Snapshot::default()
    };
    let fleet = Fleet::restore(config(), capture.clone(), start).unwrap();
    let mut tables = Tables::default();
    tables.fold(
        &shared_secrets()
            .into_iter()
            .map(|(name, value)| Change::PutSecret { name, value })
            .collect::<Vec<_>>(),
    );
    fleet.register("srv-0", description(0)).await.unwrap();
    let mut stream = fleet.subscribe_instructions("srv-0").unwrap();
    for submission in capture.take() {
        tables.fold(&submission);
    }
    let spec = CreateSpec {
        name: "s".into(),
        owner: "u".into(),
        kind: Some(SessionKind::Virtual),
        ..CreateSpec::default()
    };
    // Created here, but its submission never reaches the tables (a group
    // that failed to commit): the reload forgets it.
    fleet
        .create_sessions(std::slice::from_ref(&spec), |_, _| {})
        .await
        .unwrap();
    let lost = one_session(&fleet);
    assert!(matches!(
        stream.try_recv(),
        Ok(Instruction::Create { session, .. }) if *session == *lost.id
    ));
    capture.take();
    fleet.reload(&tables.snapshot()).unwrap();
    assert!(sessions(&fleet).is_empty());
    assert_eq!(servers(&fleet).len(), 1);

    // The agent's stream, opened before the reload, carries what comes
    // after it.
    fleet.create_sessions(&[spec], |_, _| {}).await.unwrap();
    let kept = one_session(&fleet);
    assert_ne!(kept.id, lost.id);
    match stream.try_recv() {
        Ok(Instruction::Create { session, .. }) => assert_eq!(*session, *kept.id),
        other => panic!("expected the create instruction, got {other:?}"),
    }
}

#[tokio::test]
async fn tokens_and_revocations_reach_a_follower() {
    let capture = Arc::new(Capture::default());
    let start = Snapshot {
        secrets: shared_secrets(),
        ..Snapshot::default()
    };
    let leader = Auth::restore(AuthConfig::default(), capture.clone(), &start)
        .await
        .unwrap();
    // A follower that started with another signing key (before it read
    // the shared one): the replicated key replaces it.
    let follower = Auth::restore(
        AuthConfig::default(),
        Arc::new(Capture::default()),
        &Snapshot {
            secrets: vec![("token-signing-key/hs256".into(), vec![9; 32])],
            ..Snapshot::default()
        },
    )
    .await
    .unwrap();
    let registered = leader
        .register("ops", ScopeSet::from(Scope::Read), None)
        .await
        .unwrap();
    let token = leader
        .issue_token(&registered.client.id, &registered.secret, None)
        .await
        .unwrap()
        .access_token;
    assert!(follower.authenticate(&token).is_err(), "not yet known here");
    let mut changes: Vec<Change> = capture.take().into_iter().flatten().collect();
    changes.push(Change::PutSecret {
        name: "token-signing-key/hs256".into(),
        value: vec![3; 32],
    });
    follower.apply_replicated(&changes);
    let principal = follower.authenticate(&token).unwrap();
    assert_eq!(&*principal.client_id, registered.client.id.as_str());

    // A third replica reloading the same tables agrees.
    let mut tables = Tables::default();
    tables.fold(
        &shared_secrets()
            .into_iter()
            .map(|(name, value)| Change::PutSecret { name, value })
            .collect::<Vec<_>>(),
    );
    tables.fold(&changes);
    let reloaded = Auth::in_memory(AuthConfig::default()).await.unwrap();
    assert!(reloaded.authenticate(&token).is_err());
    reloaded.reload(&tables.snapshot()).unwrap();
    assert!(reloaded.authenticate(&token).is_ok());

    // The revocation: the follower's open calls are told at once, and the
    // token stops working there with the change applied.
    let mut revocations = follower.revocations();
    revocations.borrow_and_update();
    leader.revoke(&registered.client.id).await.unwrap();
    let revoked: Vec<Change> = capture.take().into_iter().flatten().collect();
    assert!(follower.authenticate(&token).is_ok());
    follower.apply_replicated(&revoked);
    assert!(revocations.has_changed().unwrap());
    assert!(follower.authenticate(&token).is_err());

    // A reload that brings the revocation fires it too.
    let mut revocations = reloaded.revocations();
    revocations.borrow_and_update();
    tables.fold(&revoked);
    reloaded.reload(&tables.snapshot()).unwrap();
    assert!(revocations.has_changed().unwrap());
    assert!(reloaded.authenticate(&token).is_err());
}

/// A replica that does not lead refuses to register or revoke clients
/// before touching its registry: a refused change must not live on in
/// memory (a client only this follower would accept, until its next
/// reload).
#[tokio::test]
async fn a_follower_neither_registers_nor_revokes_clients() {
    let capture = Arc::new(Capture::default());
    let auth = Auth::restore(AuthConfig::default(), capture.clone(), &Snapshot::default())
        .await
        .unwrap();
    let kept = auth
        .register("kept", ScopeSet::from(Scope::Read), None)
        .await
        .unwrap();
    capture.take();
    auth.set_writable(false);
    let refused = auth
        .register("new", ScopeSet::from(Scope::Read), None)
        .await
        .unwrap_err();
    assert_eq!(refused, dcv_broker::auth::AuthError::NotLeader);
    assert_eq!(
        auth.revoke(&kept.client.id).await.unwrap_err(),
        dcv_broker::auth::AuthError::NotLeader
    );
    let listed = auth.list();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(listed[0].revoked_at.is_none(), "{listed:?}");
    assert!(auth.is_active(&kept.client.id));
    assert!(capture.take().is_empty(), "nothing was submitted");
    auth.set_writable(true);
    auth.revoke(&kept.client.id).await.unwrap();
    assert!(!auth.is_active(&kept.client.id));
}
