//! Acceptance test: a close and a placement racing each other can never
//! leave a new session on a closed server.
//!
//! What it proves. The broker promises (sessions.proto, servers.proto) that
//! placement and CloseServers run under the fleet's one write lock, and that
//! a close without Force counts placements the agent has not confirmed yet
//! as running sessions. So, whatever the interleaving:
//! 1. no session is ever placed on a server while it is closed;
//! 2. no close without Force ever succeeds on a server that something
//!    occupies (a reported session or a placement in flight);
//! 3. the fleet's event trail is gap-free and in order, so (1) and (2) can
//!    be judged from it, and it is exact: a session leaves only a server it
//!    occupies, appears only where it does not already occupy one (a
//!    placement its agent confirms is no arrival), every placement obeys
//!    the placement rules (type, capacity, one session per user per server)
//!    against the occupancy the trail shows, each close or open in it is a
//!    client's successful item, and the broker ends with exactly the closed
//!    servers the trail says;
//! 4. the run really raced: it placed sessions, closed servers without
//!    Force, was refused closes (DCV_SERVER_HAS_RUNNING_SESSIONS) and
//!    failed creations (NO_SERVER_AVAILABLE);
//! 5. every session a client was told was placed on a server has that
//!    placement in the trail.
//!
//! How. A real broker on 127.0.0.1:0 runs the simulated fleet
//! (`demo::spawn` with 18 servers, the smallest that includes a macOS one:
//! Linux, Windows and macOS, some already running a session; the agents create and delete sessions at once and heartbeat
//! every 20 ms, so placements turn into reported sessions, and deletions
//! into departures, while the test runs). The test subscribes to
//! `Fleet::events()` before any server exists, with a buffer big enough to
//! hold the whole run. Then creator, closer, opener and deleter tasks, each
//! on its own gRPC channel, fire a fixed number of requests at once: mixed
//! CONSOLE/VIRTUAL creations (single, small batches, queued, and batches
//! that must overflow one owner's per-server limit), closes with and
//! without Force, opens, and deletions (some forced) of what
//! DescribeSessions shows. The Spread strategy sends new sessions to the
//! emptiest servers, exactly the ones a close without Force can succeed
//! on, so the two contend all the time. The request mix comes from fixed
//! seeds (set `PLACEMENT_RACE_SEED` to vary it); only the interleaving
//! differs between runs, and every assertion holds for any interleaving.
//!
//! Afterwards the test stops the simulated agents, drains the trail (a
//! lagged receiver fails the test) and replays it in sequence order,
//! tracking each server's closed flag and occupancy, and checks the client
//! side facts against it. A broker whose close forgot the placements in
//! flight (counting only the sessions agents report) fails check 2 within
//! the first few dozen events; one whose placement ignored closed servers
//! fails check 1 as fast. The run takes about 2 s in a debug build.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use common::*;
use dcv_broker::{
    demo,
    fleet::{FleetEvent, OsFamily, SequencedEvent, SessionKind},
    pb::{self, FailureCode, servers_client::ServersClient, sessions_client::SessionsClient},
};
use tokio::sync::broadcast::error::TryRecvError;
use tonic::transport::Channel;

/// Simulated servers: indices 0..18 hold twelve Linux servers (one with an
/// unhealthy DCV server), five Windows servers (one with an RDP user
/// logged in) and one macOS server; servers 2, 8, 12, 15 and 17 already
/// run a session their agent started.
const SERVERS: usize = 18;

const CREATORS: u64 = 3;
const CREATE_REQUESTS: usize = 200;
/// One creation request in this many is a batch of VIRTUAL sessions for a
/// single owner, longer than the number of Linux servers: with at most one
/// session per user per server, part of it must fail with
/// NO_SERVER_AVAILABLE.
const OVERFLOW_EVERY: usize = 15;
const OVERFLOW_BATCH: usize = 14;

const CLOSERS: u64 = 2;
const CLOSE_REQUESTS: usize = 300;
const OPENERS: u64 = 1;
const OPEN_REQUESTS: usize = 400;
const DELETERS: u64 = 2;
const DELETE_ROUNDS: usize = 200;

const OWNERS: &[&str] = &[
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];

/// SplitMix64: a small, seeded, good-enough generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// `n` distinct indices below `len` (fewer if `len < n`).
    fn distinct(&mut self, n: usize, len: usize) -> Vec<usize> {
        let mut picked = Vec::new();
        while picked.len() < n.min(len) {
            let i = self.below(len);
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        picked
    }
}

fn base_seed() -> u64 {
    std::env::var("PLACEMENT_RACE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00C0_FFEE)
}

fn code(c: i32) -> FailureCode {
    FailureCode::try_from(c).unwrap()
}

/// A session a CreateSessions reply returned.
struct Created {
    id: String,
    owner: String,
    kind: SessionKind,
    /// The server the reply named; `None` when it was queued.
    server: Option<String>,
}

/// What the clients saw.
#[derive(Default)]
struct Facts {
    requests: usize,
    created: Vec<Created>,
    no_server_available: usize,
    /// Successful close items without Force, by server.
    closed_unforced: BTreeMap<String, usize>,
    /// Successful close items with Force, by server.
    closed_forced: BTreeMap<String, usize>,
    /// Close items refused with DCV_SERVER_HAS_RUNNING_SESSIONS.
    close_refused: usize,
    /// Successful open items, by server.
    opened: BTreeMap<String, usize>,
    deleted: usize,
    deleted_forced: usize,
}

impl Facts {
    fn merge(&mut self, other: Facts) {
        fn add(into: &mut BTreeMap<String, usize>, from: BTreeMap<String, usize>) {
            for (k, v) in from {
                *into.entry(k).or_default() += v;
            }
        }
        self.requests += other.requests;
        self.created.extend(other.created);
        self.no_server_available += other.no_server_available;
        add(&mut self.closed_unforced, other.closed_unforced);
        add(&mut self.closed_forced, other.closed_forced);
        self.close_refused += other.close_refused;
        add(&mut self.opened, other.opened);
        self.deleted += other.deleted;
        self.deleted_forced += other.deleted_forced;
    }
}

fn kind_of(t: i32) -> SessionKind {
    match pb::SessionType::try_from(t).unwrap() {
        pb::SessionType::Console => SessionKind::Console,
        pb::SessionType::Virtual => SessionKind::Virtual,
        other => panic!("a created session has type {other:?}"),
    }
}

fn create_item(
    name: String,
    owner: &str,
    kind: pb::SessionType,
    enqueue: bool,
) -> pb::CreateSessionRequestData {
    pb::CreateSessionRequestData {
        name,
        owner: owner.into(),
        r#type: kind as i32,
        enqueue_request: enqueue,
        ..Default::default()
    }
}

async fn creator(mut client: SessionsClient<Channel>, seed: u64) -> Facts {
    let mut rng = Rng(seed);
    let mut facts = Facts::default();
    for round in 0..CREATE_REQUESTS {
        let items: Vec<_> = if rng.below(OVERFLOW_EVERY) == 0 {
            let owner = OWNERS[rng.below(OWNERS.len())];
            (0..OVERFLOW_BATCH)
                .map(|k| {
                    let name = format!("overflow-{seed}-{round}-{k}");
                    create_item(name, owner, pb::SessionType::Virtual, false)
                })
                .collect()
        } else {
            (0..1 + rng.below(3))
                .map(|k| {
                    let kind = if rng.below(3) == 0 {
                        pb::SessionType::Console
                    } else {
                        pb::SessionType::Virtual
                    };
                    let owner = OWNERS[rng.below(OWNERS.len())];
                    let enqueue = rng.below(10) == 0;
                    create_item(format!("race-{seed}-{round}-{k}"), owner, kind, enqueue)
                })
                .collect()
        };
        let sent = items.len();
        let reply = client
            .create_sessions(pb::CreateSessionsRequest {
                sessions: items,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        facts.requests += 1;
        assert_eq!(
            reply.successful_list.len() + reply.unsuccessful_list.len(),
            sent,
            "one result per item"
        );
        for s in reply.successful_list {
            facts.created.push(Created {
                kind: kind_of(s.r#type),
                server: s.server.map(|server| server.id),
                id: s.id,
                owner: s.owner,
            });
        }
        for f in reply.unsuccessful_list {
            let data = f.create_session_request_data.unwrap();
            assert_eq!(
                code(f.failure_code),
                FailureCode::NoServerAvailable,
                "{}: {}",
                data.name,
                f.failure_reason
            );
            assert!(!data.enqueue_request, "a queued request cannot fail so");
            facts.no_server_available += 1;
        }
    }
    facts
}

async fn closer(mut client: ServersClient<Channel>, seed: u64) -> Facts {
    let mut rng = Rng(seed);
    let mut facts = Facts::default();
    for _ in 0..CLOSE_REQUESTS {
        let batch = 1 + rng.below(3);
        let mut force_of = HashMap::new();
        let items: Vec<_> = rng
            .distinct(batch, SERVERS)
            .into_iter()
            .map(|i| {
                let id = demo::server_id(i);
                let force = match rng.below(8) {
                    0 | 1 => Some(true),
                    2 | 3 => Some(false),
                    _ => None,
                };
                force_of.insert(id.clone(), force == Some(true));
                close_item(&id, force, "placement race")
            })
            .collect();
        let reply = client
            .close_servers(close_req(items))
            .await
            .unwrap()
            .into_inner();
        facts.requests += 1;
        assert_eq!(
            reply.successful_list.len() + reply.unsuccessful_list.len(),
            batch
        );
        for ok in reply.successful_list {
            let tally = if force_of[&ok.server_id] {
                &mut facts.closed_forced
            } else {
                &mut facts.closed_unforced
            };
            *tally.entry(ok.server_id).or_default() += 1;
        }
        for f in reply.unsuccessful_list {
            let data = f.close_server_request_data.unwrap();
            assert_eq!(
                code(f.failure_code),
                FailureCode::DcvServerHasRunningSessions,
                "{}: {}",
                data.server_id,
                f.failure_reason
            );
            assert_eq!(data.force, Some(false), "a forced close is never refused");
            facts.close_refused += 1;
        }
    }
    facts
}

async fn opener(mut client: ServersClient<Channel>, seed: u64) -> Facts {
    let mut rng = Rng(seed);
    let mut facts = Facts::default();
    for _ in 0..OPEN_REQUESTS {
        let batch = 1 + rng.below(3);
        let ids: Vec<String> = rng
            .distinct(batch, SERVERS)
            .into_iter()
            .map(demo::server_id)
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let reply = client
            .open_servers(open_req(&ids))
            .await
            .unwrap()
            .into_inner();
        facts.requests += 1;
        assert!(
            reply.unsuccessful_list.is_empty(),
            "{:?}",
            reply.unsuccessful_list
        );
        assert_eq!(reply.successful_list.len(), ids.len());
        for ok in reply.successful_list {
            *facts.opened.entry(ok.server_id).or_default() += 1;
        }
    }
    facts
}

async fn deleter(mut client: SessionsClient<Channel>, seed: u64) -> Facts {
    let mut rng = Rng(seed);
    let mut facts = Facts::default();
    for _ in 0..DELETE_ROUNDS {
        let page = client
            .describe_sessions(pb::DescribeSessionsRequest {
                filters: vec![pb::KeyValuePair {
                    key: "state".into(),
                    value: "READY".into(),
                }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        facts.requests += 1;
        if page.sessions.is_empty() {
            continue;
        }
        let batch = 1 + rng.below(6);
        let picked = rng.distinct(batch, page.sessions.len());
        let items: Vec<_> = picked
            .into_iter()
            .map(|i| {
                let s = &page.sessions[i];
                let force = rng.below(8) == 0;
                pb::DeleteSessionRequestData {
                    session_id: s.id.clone(),
                    owner: s.owner.clone(),
                    force: Some(force),
                }
            })
            .collect();
        let forced = items.iter().filter(|i| i.force == Some(true)).count();
        let sent = items.len();
        let reply = client
            .delete_sessions(pb::DeleteSessionsRequest {
                sessions: items,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        facts.requests += 1;
        assert!(
            reply.unsuccessful_list.is_empty(),
            "{:?}",
            reply.unsuccessful_list
        );
        assert_eq!(reply.successful_list.len(), sent);
        facts.deleted += sent;
        facts.deleted_forced += forced;
    }
    facts
}

/// What the replay of the event trail found.
#[derive(Default)]
struct Replay {
    violations: Vec<String>,
    closed: BTreeSet<Arc<str>>,
    placements: usize,
    placements_on_empty: usize,
    appeared: usize,
    left: usize,
    closed_unforced: BTreeMap<String, usize>,
    closed_forced: BTreeMap<String, usize>,
    opened: BTreeMap<String, usize>,
    placed: HashSet<(Arc<str>, Arc<str>)>,
}

/// Replays the trail in sequence order. `sessions` gives the type and
/// owner of every session the test knows (created or started by an agent).
fn replay(history: &[SequencedEvent], sessions: &HashMap<String, (SessionKind, String)>) -> Replay {
    let mut r = Replay::default();
    // Server -> the sessions occupying it; session -> its server.
    let mut occupancy: HashMap<Arc<str>, BTreeSet<Arc<str>>> = HashMap::new();
    let mut home: HashMap<Arc<str>, Arc<str>> = HashMap::new();
    let description =
        |server: &str| demo::description(demo::index_of(server).expect("a simulated server id"));
    let mut previous = 0;
    for SequencedEvent { seq, event } in history {
        let seq = *seq;
        if seq != previous + 1 {
            r.violations
                .push(format!("seq {seq} follows {previous}: a gap or reordering"));
        }
        previous = seq;
        let mut violation = |what: String| r.violations.push(format!("seq {seq}: {what}"));
        match event {
            FleetEvent::ServerClosed { server, force } => {
                let occupants = occupancy.get(server).map_or(0, BTreeSet::len);
                if !force && occupants > 0 {
                    violation(format!(
                        "{server} closed without Force while {occupants} session(s) occupy it: {:?}",
                        occupancy[server]
                    ));
                }
                if !r.closed.insert(server.clone()) {
                    violation(format!(
                        "ServerClosed for {server}, which was closed already"
                    ));
                }
                let tally = if *force {
                    &mut r.closed_forced
                } else {
                    &mut r.closed_unforced
                };
                *tally.entry(server.to_string()).or_default() += 1;
            }
            FleetEvent::ServerOpened { server } => {
                if !r.closed.remove(server) {
                    violation(format!("ServerOpened for {server}, which was open"));
                }
                *r.opened.entry(server.to_string()).or_default() += 1;
            }
            FleetEvent::SessionPlaced { session, server } => {
                r.placements += 1;
                r.placed.insert((session.clone(), server.clone()));
                if r.closed.contains(server) {
                    violation(format!("{session} placed on {server}, which is closed"));
                }
                if let Some(other) = home.get(session) {
                    violation(format!(
                        "{session} placed on {server} while it occupies {other}"
                    ));
                }
                let occupants = occupancy.entry(server.clone()).or_default();
                if occupants.is_empty() {
                    r.placements_on_empty += 1;
                }
                // The placement rules, against the occupancy the trail shows.
                match sessions.get(&**session) {
                    None => violation(format!("{session} placed, but no client created it")),
                    Some((kind, owner)) => {
                        let d = description(server);
                        let kinds: Vec<_> = occupants
                            .iter()
                            .filter_map(|s| sessions.get(&**s))
                            .collect();
                        let fits = match kind {
                            SessionKind::Console => occupants.is_empty(),
                            SessionKind::Virtual => {
                                d.host.os.family == OsFamily::Linux
                                    && kinds.iter().all(|(k, _)| *k == SessionKind::Virtual)
                                    && occupants.len() < d.max_virtual_sessions as usize
                            }
                        };
                        if !fits {
                            violation(format!(
                                "{kind:?} session {session} placed on {server}, which it does not fit: {occupants:?}"
                            ));
                        }
                        let per_user = d.max_concurrent_sessions_per_user as usize;
                        let same_owner = kinds.iter().filter(|(_, o)| o == owner).count();
                        if per_user > 0 && same_owner >= per_user {
                            violation(format!(
                                "{session} of {owner} placed on {server}, where {owner} already runs {same_owner}"
                            ));
                        }
                    }
                }
                occupants.insert(session.clone());
                home.insert(session.clone(), server.clone());
            }
            FleetEvent::SessionAppeared { session, server } => {
                r.appeared += 1;
                // A placement the agent now reports is no arrival.
                if let Some(at) = home.get(session) {
                    violation(format!(
                        "{session} appeared on {server} while it occupies {at}"
                    ));
                }
                occupancy
                    .entry(server.clone())
                    .or_default()
                    .insert(session.clone());
                home.insert(session.clone(), server.clone());
            }
            FleetEvent::SessionLeft { session, server } => {
                r.left += 1;
                let was_there = occupancy.get_mut(server).is_some_and(|o| o.remove(session));
                if !was_there {
                    violation(format!("{session} left {server}, which it did not occupy"));
                }
                if home.get(session) == Some(server) {
                    home.remove(session);
                }
            }
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_and_a_placement_racing_each_other_never_leave_a_new_session_on_a_closed_server() {
    let started = std::time::Instant::now();
    // What the coverage below relies on: every OS family, servers that
    // already run a session (closes without Force are refused there), and
    // fewer Linux servers than an overflow batch has items, with one
    // session per user per server (so part of each overflow batch fails).
    let fleet: Vec<_> = (0..SERVERS).map(demo::description).collect();
    for family in [OsFamily::Linux, OsFamily::Windows, OsFamily::Macos] {
        assert!(
            fleet.iter().any(|d| d.host.os.family == family),
            "{family:?}"
        );
    }
    assert!((0..SERVERS).any(|i| !demo::heartbeat(i).sessions.is_empty()));
    let linux = fleet
        .iter()
        .filter(|d| d.host.os.family == OsFamily::Linux)
        .count();
    assert!(linux < OVERFLOW_BATCH);
    assert!(
        fleet
            .iter()
            .all(|d| d.max_concurrent_sessions_per_user == 1)
    );

    let mut config = quiet_config();
    // The whole trail stays in the receiver until the end: a run emits about
    // 2,000 events, so 65,536 leaves a wide margin (and a lag fails the
    // test rather than hiding events). 1 << 20 would cost ~70 MB up front.
    config.fleet.event_buffer = 1 << 16;
    config.fleet.heartbeat_interval = Duration::from_millis(20);
    config.demo_fleet = 0;
    let mut broker = Broker::start(config).await;
    // Subscribed before any server exists: the trail starts at seq 1.
    let mut events = broker.fleet.events();
    let agents = demo::spawn(broker.fleet.clone(), SERVERS);

    let seed = base_seed();
    let mut tasks = Vec::new();
    for t in 0..CREATORS {
        let client = SessionsClient::new(broker.channel().await);
        tasks.push(tokio::spawn(creator(client, seed ^ (0x100 + t))));
    }
    for t in 0..CLOSERS {
        let client = ServersClient::new(broker.channel().await);
        tasks.push(tokio::spawn(closer(client, seed ^ (0x200 + t))));
    }
    for t in 0..OPENERS {
        let client = ServersClient::new(broker.channel().await);
        tasks.push(tokio::spawn(opener(client, seed ^ (0x300 + t))));
    }
    for t in 0..DELETERS {
        let client = SessionsClient::new(broker.channel().await);
        tasks.push(tokio::spawn(deleter(client, seed ^ (0x400 + t))));
    }
    let mut facts = Facts::default();
    for task in tasks {
        facts.merge(task.await.expect("a client task panicked"));
    }

    // Stop the agents so the trail stops growing, then drain it.
    agents.abort();
    let _ = agents.await;
    let mut history = Vec::new();
    loop {
        match events.try_recv() {
            Ok(event) => history.push(event),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::Lagged(n)) => panic!("the trail lost {n} events"),
            Err(TryRecvError::Closed) => panic!("the trail closed"),
        }
    }
    assert_eq!(
        history.first().map(|e| e.seq),
        Some(1),
        "the trail starts at 1"
    );

    // Every session whose type and owner the test knows.
    let mut sessions: HashMap<String, (SessionKind, String)> = HashMap::new();
    for index in 0..SERVERS {
        for s in demo::heartbeat(index).sessions {
            sessions.insert(s.id, (s.kind, s.owner));
        }
    }
    for c in &facts.created {
        let fresh = sessions
            .insert(c.id.clone(), (c.kind, c.owner.clone()))
            .is_none();
        assert!(fresh, "session id {} was handed out twice", c.id);
    }

    let r = replay(&history, &sessions);
    let shown = r.violations.len().min(20);
    assert!(
        r.violations.is_empty(),
        "{} violation(s) in {} events; the first {shown}:\n{}",
        r.violations.len(),
        history.len(),
        r.violations[..shown].join("\n")
    );

    // (5) What clients were told matches the trail.
    let mut queued = 0;
    for c in &facts.created {
        match &c.server {
            Some(server) => assert!(
                r.placed
                    .contains(&(Arc::from(c.id.as_str()), Arc::from(server.as_str()))),
                "{} was created on {server}, but the trail has no such placement",
                c.id
            ),
            None => queued += 1,
        }
    }
    // Each close or open in the trail is some client's successful item.
    for (trail, client, what) in [
        (
            &r.closed_unforced,
            &facts.closed_unforced,
            "closes without Force",
        ),
        (&r.closed_forced, &facts.closed_forced, "closes with Force"),
        (&r.opened, &facts.opened, "opens"),
    ] {
        for (server, n) in trail {
            let told = client.get(server).copied().unwrap_or(0);
            assert!(
                *n <= told,
                "{server}: {n} {what} in the trail, clients saw {told}"
            );
        }
    }
    // The broker ends up with exactly the servers the trail says are closed.
    let mut servers = broker.servers().await;
    let closed_now: BTreeSet<Arc<str>> = servers
        .describe_servers(pb::DescribeServersRequest {
            filters: vec![pb::KeyValuePair {
                key: "closed".into(),
                value: "true".into(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .servers
        .into_iter()
        .map(|s| Arc::from(s.id))
        .collect();
    assert_eq!(closed_now, r.closed, "closed servers: broker vs trail");

    // (4) The run exercised every side of the race.
    let unforced_closes: usize = r.closed_unforced.values().sum();
    let forced_closes: usize = r.closed_forced.values().sum();
    let opens: usize = r.opened.values().sum();
    let summary = format!(
        "{} requests, {} events in {:.2?}: {} placements ({} onto empty servers, {} created \
         queued), {} appeared, {} left; closes without Force: {} \
         transitions ({} items succeeded), {} refused; closes with Force: {} transitions; \
         {} opens; {} NO_SERVER_AVAILABLE; {} deletions ({} forced)",
        facts.requests,
        history.len(),
        started.elapsed(),
        r.placements,
        r.placements_on_empty,
        queued,
        r.appeared,
        r.left,
        unforced_closes,
        facts.closed_unforced.values().sum::<usize>(),
        facts.close_refused,
        forced_closes,
        opens,
        facts.no_server_available,
        facts.deleted,
        facts.deleted_forced,
    );
    println!("{summary}");
    assert!(r.placements > 0, "no placement: {summary}");
    assert!(
        r.placements_on_empty > 0,
        "no placement onto an empty server: {summary}"
    );
    assert!(unforced_closes > 0, "no close without Force: {summary}");
    assert!(facts.close_refused > 0, "no refused close: {summary}");
    assert!(
        facts.no_server_available > 0,
        "no NO_SERVER_AVAILABLE: {summary}"
    );
    assert!(
        forced_closes > 0 && opens > 0,
        "closes and opens: {summary}"
    );
    assert!(r.left > 0, "no session ever left: {summary}");

    broker.stop();
}
