//! Acceptance tests of several brokers on one PostgreSQL (issue 16), on the
//! real `dcv-broker` binary: three replicas (`--database-url`, a node id
//! each, a 1 s lease) on a throwaway PostgreSQL of the test's own (or
//! `DCV_BROKER_TEST_DATABASE_URL`'s server; the test that stops PostgreSQL
//! then skips, since it cannot restart a server it does not own).
//!
//! 1. Any replica answers: a close through any replica is visible through
//!    every replica (at once through the one that answered); a follower
//!    applies a leader's change within 100 ms at p99; every RPC works
//!    through a follower, an agent's included (register, heartbeat, its
//!    instruction stream relayed, its reports forwarded).
//! 2. SIGKILL of the leader at random moments, 20 times, while four
//!    clients send Close/Open batches through all replicas: every
//!    acknowledged change is there afterwards (on every replica and in the
//!    database), no batch is half applied, a new leader serves writes;
//!    failover times printed.
//! 3. SIGSTOP of the leader past its lease: another takes over; after
//!    SIGCONT the old leader commits nothing (checked in the database's
//!    tables and change log) and becomes a follower.
//! 4. PostgreSQL stopped (as by a crash) and started again under load:
//!    nothing acknowledged is lost, writes fail with UNAVAILABLE during
//!    the outage while reads answer, and writes work again afterwards with
//!    no broker restarted.
//! 5. The placement race across replicas: closes through one replica,
//!    creations through the others, and no session ends on a server that
//!    was closed when it was placed.
//!
//! How acknowledged state is tracked (2 and 4), as `tests/durability.rs`
//! does for one broker: each client owns five servers and sends batches
//! that close all five (a reason naming the operation) or open all five,
//! one at a time. A client's call is finished when its reply comes back,
//! whatever the reply, so its operations reach the cluster in order; the
//! client keeps the set of states its servers may be in (an acknowledged
//! operation is applied to every possible state; a failed one may or may
//! not have been, so both are kept). Afterwards the five servers must show
//! one and the same state (no half batch), and it must be in the set. A
//! close of a closed server keeps the first reason (the broker's rule),
//! which the set follows.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::{
    postgres::TestDatabase,
    process::{Replica, WRITES_HEALTH, wait_for_leader, wait_for_leader_among},
    *,
};
use dcv_broker::pb::{
    self, FailureCode, agent_client::AgentClient, servers_client::ServersClient,
    sessions_client::SessionsClient,
};
use tokio::time::Instant;
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

/// How long a cluster may take to elect its first leader, or a new one.
const ELECTION: Duration = Duration::from_secs(20);
/// How long a follower may take to show a change its leader committed, in
/// the checks that wait for convergence (the latency test measures it).
const CONVERGE: Duration = Duration::from_secs(10);

/// A tiny deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::env::var("CLUSTER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xC1_u64)
}

/// Starts `n` replicas, one after the other, named `node-0`...; returns
/// them and the index of the one that leads.
async fn cluster(db: &TestDatabase, n: usize, extra: &[&str]) -> (Vec<Replica>, usize) {
    let mut replicas = Vec::new();
    for i in 0..n {
        replicas.push(Replica::start(&db.url, &format!("node-{i}"), extra).await);
    }
    let leader = wait_for_leader(&replicas, ELECTION).await;
    for (i, r) in replicas.iter().enumerate() {
        if i != leader {
            r.wait_following(ELECTION).await;
        }
    }
    (replicas, leader)
}

/// A registration with a tag `cluster=VALUE`, for requirements to target.
fn tagged(id: &str, value: &str, max_virtual: i32) -> pb::RegisterServerRequest {
    let mut r = registration(id, "linux", max_virtual);
    r.tags.push(pb::KeyValuePair {
        key: "cluster".into(),
        value: value.into(),
    });
    r
}

/// The reason of a server's close hold, `None` when it is open.
fn hold_reason(server: &pb::Server) -> Option<String> {
    server.holds.first().map(|h| h.reason.clone())
}

/// The servers `ids` as `replica` shows them, in the order asked.
async fn shown(channel: Channel, ids: &[String]) -> Result<Vec<pb::Server>, tonic::Status> {
    let mut servers = ServersClient::new(channel);
    let reply = servers
        .describe_servers(pb::DescribeServersRequest {
            server_ids: ids.to_vec(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut by_id: HashMap<String, pb::Server> = reply
        .servers
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect();
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

/// The close reasons of `ids` as `channel`'s replica shows them.
async fn reasons_shown(
    channel: Channel,
    ids: &[String],
) -> Result<BTreeMap<String, Option<String>>, tonic::Status> {
    Ok(shown(channel, ids)
        .await?
        .iter()
        .map(|s| (s.id.clone(), hold_reason(s)))
        .collect())
}

/// Polls `replica` until it shows `expected` for `ids` (within `CONVERGE`).
async fn wait_shows(replica: &Replica, expected: &BTreeMap<String, Option<String>>) {
    let ids: Vec<String> = expected.keys().cloned().collect();
    let deadline = Instant::now() + CONVERGE;
    loop {
        let seen = reasons_shown(replica.channel(), &ids).await;
        if seen.as_ref().ok() == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} does not converge within {CONVERGE:?}: shows {seen:?}, the leader {expected:?}",
            replica.node
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The close reasons of `ids` in the database's tables, read directly.
async fn reasons_in_database(
    db: &TestDatabase,
    ids: &[String],
) -> BTreeMap<String, Option<String>> {
    let client = db.connect().await;
    let mut found: BTreeMap<String, Option<String>> =
        ids.iter().map(|id| (id.clone(), None)).collect();
    let rows = client
        .query(
            "SELECT server_id, reason FROM holds WHERE kind = 'CLOSED' AND server_id = ANY($1)",
            &[&ids],
        )
        .await
        .expect("read the holds");
    for row in rows {
        found.insert(row.get(0), Some(row.get(1)));
    }
    let present: i64 = client
        .query_one("SELECT count(*) FROM servers WHERE id = ANY($1)", &[&ids])
        .await
        .expect("count the servers")
        .get(0);
    assert_eq!(
        present as usize,
        ids.len(),
        "every server is in the database"
    );
    found
}

/// `(holder, epoch, seq)` of the database's lease row.
async fn lease_row(db: &TestDatabase) -> (String, i64, i64) {
    let row = db
        .connect()
        .await
        .query_one("SELECT holder, epoch, seq FROM dcv_broker_leader", &[])
        .await
        .expect("the lease row");
    (row.get(0), row.get(1), row.get(2))
}

fn close_all(ids: &[String], reason: &str) -> pb::CloseServersRequest {
    pb::CloseServersRequest {
        servers: ids
            .iter()
            .map(|id| pb::CloseServerRequestData {
                server_id: id.clone(),
                force: Some(true),
                reason: reason.into(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn open_all(ids: &[String]) -> pb::OpenServersRequest {
    pb::OpenServersRequest {
        servers: ids
            .iter()
            .map(|id| pb::OpenServerRequestData {
                server_id: id.clone(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// p-th percentile (0..=100) of sorted durations, nearest rank.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ------------------------------------------------------------ acceptance 1

/// Acceptance 1: any replica answers every RPC, a change made through one
/// is visible through all, and followers apply within 100 ms (p99).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_answer_every_rpc_and_followers_apply_within_100ms() {
    let db = TestDatabase::new().await;
    let (replicas, leader) = cluster(&db, 3, &[]).await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let (f1, f2) = (&replicas[followers[0]], &replicas[followers[1]]);
    let lead = &replicas[leader];

    // Servers registered through a follower (forwarded to the leader).
    let ids: Vec<String> = (0..3).map(|i| format!("vis-{i}")).collect();
    let mut agent = AgentClient::new(f1.channel());
    for id in ids.iter().chain(["lat-0".to_string()].iter()) {
        agent
            .register_server(tagged(id, "plain", 4))
            .await
            .unwrap_or_else(|e| panic!("RegisterServer through a follower: {e:?}"));
    }

    // A close through each replica: the answering one shows it at once
    // (read-your-writes), every other one soon; then an open likewise.
    for (i, through) in replicas.iter().enumerate() {
        let id = &ids[i];
        let reason = format!("through {}", through.node);
        let reply = ServersClient::new(through.channel())
            .close_servers(close_req(vec![close_item(id, Some(true), &reason)]))
            .await
            .unwrap_or_else(|e| panic!("CloseServers through {}: {e:?}", through.node))
            .into_inner();
        assert_eq!(reply.successful_list.len(), 1, "{reply:?}");
        let at_once = reasons_shown(through.channel(), std::slice::from_ref(id))
            .await
            .unwrap();
        assert_eq!(
            at_once[id].as_deref(),
            Some(reason.as_str()),
            "{} acknowledged a close it does not show",
            through.node
        );
        let expected = BTreeMap::from([(id.clone(), Some(reason.clone()))]);
        for r in &replicas {
            wait_shows(r, &expected).await;
        }
        let opener = &replicas[(i + 1) % 3];
        let reply = ServersClient::new(opener.channel())
            .open_servers(open_req(&[id]))
            .await
            .unwrap_or_else(|e| panic!("OpenServers through {}: {e:?}", opener.node))
            .into_inner();
        assert_eq!(reply.successful_list.len(), 1, "{reply:?}");
        let at_once = reasons_shown(opener.channel(), std::slice::from_ref(id))
            .await
            .unwrap();
        assert_eq!(at_once[id], None, "{} shows its open late", opener.node);
        let expected = BTreeMap::from([(id.clone(), None)]);
        for r in &replicas {
            wait_shows(r, &expected).await;
        }
    }

    // A drain through a follower: every replica describes it (the holds
    // carry it), and an open through another ends it everywhere.
    let drain = ServersClient::new(f2.channel())
        .drain_servers(pb::DrainServersRequest {
            servers: vec![pb::DrainServerRequestData {
                server_id: ids[0].clone(),
            }],
            reason: "through a follower".into(),
            deadline_in: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("DrainServers through a follower")
        .into_inner();
    assert_eq!(drain.successful_list.len(), 1, "{drain:?}");
    let expected = BTreeMap::from([(ids[0].clone(), Some("through a follower".to_owned()))]);
    for r in &replicas {
        wait_shows(r, &expected).await;
        let drains = ServersClient::new(r.channel())
            .describe_drains(pb::DescribeDrainsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .drains;
        assert_eq!(drains.len(), 1, "{} describes {drains:?}", r.node);
        assert_eq!(drains[0].drain_id, drain.drain_id);
        assert_eq!(drains[0].state, pb::DrainState::Drained as i32);
        assert!(drains[0].deadline.is_some());
    }
    ServersClient::new(f1.channel())
        .open_servers(pb::OpenServersRequest {
            servers: vec![pb::OpenServerRequestData {
                server_id: ids[0].clone(),
                hold_name: Some("drain".into()),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let expected = BTreeMap::from([(ids[0].clone(), None)]);
    for r in &replicas {
        wait_shows(r, &expected).await;
        let drains = ServersClient::new(r.channel())
            .describe_drains(pb::DescribeDrainsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .drains;
        assert!(drains.is_empty(), "{} still describes {drains:?}", r.node);
    }

    // Every RPC through a follower. An agent registers and heartbeats
    // through f1 and holds its instruction stream there; a client works
    // through f2 (and reads its own writes there).
    let mut agent = TestAgent::connect_to(f1.addr, tagged("desk-host", "agent", 4)).await;
    agent.beat(Vec::new()).await;
    let mut sessions = SessionsClient::new(f2.channel());
    let mut item = create_item("desk", "alice", pb::SessionType::Virtual);
    item.requirements = "tag:cluster = 'agent'".into();
    let created = sessions
        .create_sessions(create_req(vec![item]))
        .await
        .expect("CreateSessions through a follower")
        .into_inner();
    assert_eq!(created.successful_list.len(), 1, "{created:?}");
    let id = created.successful_list[0].id.clone();
    assert_eq!(
        created.successful_list[0]
            .server
            .as_ref()
            .map(|s| s.id.as_str()),
        Some("desk-host")
    );
    let instruction = tokio::time::timeout(CONVERGE, agent.next_create())
        .await
        .expect("the placement reaches the agent through the follower's relayed stream");
    assert_eq!(instruction.session_id, id);
    agent
        .report(
            &id,
            pb::InstructionKind::CreateSession,
            true,
            pb::SessionState::Ready,
        )
        .await;
    agent
        .beat(vec![session(
            &id,
            pb::SessionType::Virtual,
            pb::SessionState::Ready,
        )])
        .await;
    // The agent's report went through f1; f2 shows it once applied.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let s = describe_session(&mut sessions, &id).await;
        if s.state == pb::SessionState::Ready as i32 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "f2 never showed {id} READY: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let data = sessions
        .get_session_connection_data(pb::GetSessionConnectionDataRequest {
            session_id: id.clone(),
            user: "alice".into(),
        })
        .await
        .expect("GetSessionConnectionData on a follower")
        .into_inner();
    assert!(!data.connection_token.is_empty());
    // The token a follower minted verifies on every replica: they share
    // the connection-token key.
    for r in &replicas {
        let verdict = AgentClient::new(r.channel())
            .validate_connection_token(pb::ValidateConnectionTokenRequest {
                server_id: "desk-host".into(),
                connection_token: data.connection_token.clone(),
                session_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(
            verdict.valid,
            "{} refuses a follower's token: {verdict:?}",
            r.node
        );
    }
    let updated = sessions
        .update_session_permissions(pb::UpdateSessionPermissionsRequest {
            sessions: vec![pb::UpdateSessionPermissionsRequestData {
                session_id: id.clone(),
                owner: "alice".into(),
                permissions_file: "W3Blcm1pc3Npb25zXQ==".into(),
            }],
            ..Default::default()
        })
        .await
        .expect("UpdateSessionPermissions through a follower")
        .into_inner();
    assert_eq!(updated.successful_list.len(), 1, "{updated:?}");
    match tokio::time::timeout(CONVERGE, agent.next()).await {
        Ok(Instr::UpdatePermissions(u)) => assert_eq!(u.session_id, id),
        other => panic!("expected UpdatePermissions on the relayed stream, got {other:?}"),
    }
    // Screenshots: the request goes through f2 to the leader, the
    // instruction reaches the agent through f1, its answer comes back.
    let mut asker = sessions.clone();
    let asked = id.clone();
    let call = tokio::spawn(async move {
        asker
            .get_session_screenshots(pb::GetSessionScreenshotsRequest {
                sessions: vec![pb::GetSessionScreenshotRequestData {
                    session_id: asked,
                    ..Default::default()
                }],
            })
            .await
            .map(tonic::Response::into_inner)
    });
    let (instruction_id, shot) = tokio::time::timeout(CONVERGE, agent.next_screenshot())
        .await
        .expect("the screenshot request reaches the agent");
    assert_eq!(shot.session_id, id);
    agent
        .report_screenshot(
            &id,
            &instruction_id,
            Ok(vec![pb::SessionScreenshotImage {
                format: "png".into(),
                data: png_of(8, 4),
                creation_time: Some(std::time::SystemTime::now().into()),
                primary: true,
            }]),
        )
        .await
        .expect("ReportInstructionResult through a follower");
    let shots = call
        .await
        .unwrap()
        .expect("GetSessionScreenshots through a follower");
    assert_eq!(shots.successful_list.len(), 1, "{shots:?}");

    let deleted = sessions
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![pb::DeleteSessionRequestData {
                session_id: id.clone(),
                owner: "alice".into(),
                force: None,
            }],
            ..Default::default()
        })
        .await
        .expect("DeleteSessions through a follower")
        .into_inner();
    assert_eq!(deleted.successful_list.len(), 1, "{deleted:?}");
    match tokio::time::timeout(CONVERGE, agent.next()).await {
        Ok(Instr::DeleteSession(d)) => assert_eq!(d.session_id, id),
        other => panic!("expected DeleteSession on the relayed stream, got {other:?}"),
    }
    let page = sessions
        .describe_sessions(pb::DescribeSessionsRequest::default())
        .await
        .expect("DescribeSessions on a follower")
        .into_inner();
    assert!(page.sessions.iter().any(|s| s.id == id));

    // The agent leaves through the follower.
    agent
        .client
        .deregister_server(pb::DeregisterServerRequest {
            server_id: "desk-host".into(),
        })
        .await
        .expect("DeregisterServer through a follower");

    // Follower-apply latency: a close through the leader, acknowledged,
    // then the time until a follower shows it (polled without pause); the
    // open in between is waited for the same way, unmeasured.
    let lat = vec!["lat-0".to_string()];
    let mut leader_servers = ServersClient::new(lead.channel());
    let mut samples = Vec::new();
    const CLOSES: usize = 200;
    for k in 0..CLOSES {
        let follower = &replicas[followers[k % 2]];
        let mut watcher = ServersClient::new(follower.channel());
        let reason = format!("lat-{k}");
        leader_servers
            .close_servers(close_all(&lat, &reason))
            .await
            .unwrap();
        let acked = Instant::now();
        let deadline = acked + CONVERGE;
        loop {
            let s = describe_one(&mut watcher, "lat-0").await;
            if hold_reason(&s).as_deref() == Some(reason.as_str()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never showed {reason}",
                follower.node
            );
        }
        samples.push(acked.elapsed());
        leader_servers.open_servers(open_all(&lat)).await.unwrap();
        loop {
            let s = describe_one(&mut watcher, "lat-0").await;
            if s.holds.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never showed the open",
                follower.node
            );
        }
    }
    samples.sort();
    let (median, p99, max) = (
        percentile(&samples, 50.0),
        percentile(&samples, 99.0),
        samples[samples.len() - 1],
    );
    println!(
        "follower apply latency over {CLOSES} closes through the leader: median {median:?}, \
         p99 {p99:?}, max {max:?}; the slowest five {:?}",
        &samples[samples.len().saturating_sub(5)..]
    );
    assert!(
        p99 < Duration::from_millis(100),
        "follower apply p99 {p99:?} is not under 100 ms (median {median:?})"
    );
}

/// A grey PNG of `width` x `height`.
fn png_of(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().unwrap();
    writer
        .write_image_data(&vec![128; (width * height) as usize])
        .unwrap();
    writer.finish().unwrap();
    out
}

// ------------------------------------------------------- acceptance 2 and 4

/// A state the servers of a batch client may be in.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Shown {
    Open,
    Closed(String),
}

/// One operation of a batch client.
#[derive(Debug, Clone)]
enum Op {
    Close(String),
    Open,
}

impl Op {
    /// The broker's rule: a close of a closed server keeps its reason.
    fn apply(&self, state: &Shown) -> Shown {
        match (self, state) {
            (Op::Open, _) => Shown::Open,
            (Op::Close(reason), Shown::Open) => Shown::Closed(reason.clone()),
            (Op::Close(_), closed) => closed.clone(),
        }
    }
}

/// What a batch client knows: its servers, and the states they may be in.
#[derive(Debug, Clone)]
struct BatchClient {
    name: usize,
    ids: Vec<String>,
    possible: BTreeSet<Shown>,
    next_op: u64,
    rng: u64,
    acked: u64,
    failed: BTreeMap<String, u64>,
    /// The longest a call took, acknowledged or not.
    slowest: Duration,
}

impl BatchClient {
    fn new(name: usize, seed: u64) -> BatchClient {
        BatchClient {
            name,
            ids: (0..5).map(|i| format!("batch-{name}-{i}")).collect(),
            possible: BTreeSet::from([Shown::Open]),
            next_op: 0,
            rng: seed ^ (name as u64 + 1),
            acked: 0,
            failed: BTreeMap::new(),
            slowest: Duration::ZERO,
        }
    }

    fn record(&mut self, op: &Op, acked: bool) {
        let after: BTreeSet<Shown> = self.possible.iter().map(|s| op.apply(s)).collect();
        if acked {
            self.possible = after;
        } else {
            self.possible.extend(after);
        }
    }

    /// Checks what the cluster shows against what was acknowledged; the
    /// state shown becomes the only possible one.
    fn check(&mut self, shown: &BTreeMap<String, Option<String>>, whose: &str) {
        let states: BTreeSet<Shown> = self
            .ids
            .iter()
            .map(|id| match shown.get(id) {
                Some(Some(reason)) => Shown::Closed(reason.clone()),
                Some(None) => Shown::Open,
                None => panic!("{whose}: server {id} is gone"),
            })
            .collect();
        assert_eq!(
            states.len(),
            1,
            "{whose}: half-applied batch of client {}: {shown:?}",
            self.name
        );
        let state = states.into_iter().next().unwrap();
        assert!(
            self.possible.contains(&state),
            "{whose}: client {} shows {state:?}, but after {} acknowledged operations only \
             {:?} are possible",
            self.name,
            self.acked,
            self.possible
        );
        self.possible = BTreeSet::from([state]);
    }
}

/// What the clients share with the test while they run.
#[derive(Default)]
struct Progress {
    stop: AtomicBool,
    acks: AtomicU64,
    /// When the leader was killed (or the database stopped).
    mark: Mutex<Option<Instant>>,
    /// The first acknowledgement of a call sent after `mark`.
    first_ack_after_mark: Mutex<Option<Instant>>,
    /// Calls sent after `mark` and refused, by code.
    refused_after_mark: Mutex<BTreeMap<String, u64>>,
}

impl Progress {
    fn set_mark(&self, at: Option<Instant>) {
        *self.mark.lock().unwrap() = at;
        *self.first_ack_after_mark.lock().unwrap() = None;
        self.refused_after_mark.lock().unwrap().clear();
    }
}

/// Sends random close-all / open-all batches, each to the next replica in
/// turn, until told to stop.
async fn run_batch_client(
    channels: Vec<Channel>,
    mut client: BatchClient,
    progress: Arc<Progress>,
) -> BatchClient {
    let mut rng = Rng(client.rng);
    while !progress.stop.load(Ordering::Relaxed) {
        let k = client.next_op;
        client.next_op += 1;
        let op = if rng.below(2) == 0 {
            Op::Close(format!("c{}-op{k}", client.name))
        } else {
            Op::Open
        };
        let mut servers =
            ServersClient::new(channels[(k as usize + client.name) % channels.len()].clone());
        let sent = Instant::now();
        let result = match &op {
            Op::Close(reason) => servers
                .close_servers(close_all(&client.ids, reason))
                .await
                .map(|r| r.into_inner().unsuccessful_list.len()),
            Op::Open => servers
                .open_servers(open_all(&client.ids))
                .await
                .map(|r| r.into_inner().unsuccessful_list.len()),
        };
        client.slowest = client.slowest.max(sent.elapsed());
        let after_mark = progress.mark.lock().unwrap().is_some_and(|m| sent > m);
        match result {
            Ok(failed) => {
                assert_eq!(failed, 0, "client {}: op {k} failed items", client.name);
                client.record(&op, true);
                client.acked += 1;
                progress.acks.fetch_add(1, Ordering::Relaxed);
                if after_mark {
                    progress
                        .first_ack_after_mark
                        .lock()
                        .unwrap()
                        .get_or_insert_with(Instant::now);
                }
            }
            Err(status) => {
                client.record(&op, false);
                let code = format!("{:?}", status.code());
                *client.failed.entry(code.clone()).or_default() += 1;
                if after_mark {
                    *progress
                        .refused_after_mark
                        .lock()
                        .unwrap()
                        .entry(code)
                        .or_default() += 1;
                }
                // Not synchronisation: a pause before retrying, so that a
                // replica being down does not turn into a busy loop.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    client
}

/// Registers the clients' servers through `channel`.
async fn register_batch_servers(channel: Channel, clients: &[BatchClient]) {
    let mut agent = AgentClient::new(channel);
    for id in clients.iter().flat_map(|c| c.ids.iter()) {
        agent.register_server(tagged(id, "batch", 4)).await.unwrap();
    }
}

/// Checks every client against what the leader, every running follower
/// (once converged to the leader) and the database show.
async fn check_batch_clients(
    db: &TestDatabase,
    replicas: &[Replica],
    leader: usize,
    clients: &mut [BatchClient],
) {
    let ids: Vec<String> = clients.iter().flat_map(|c| c.ids.clone()).collect();
    let in_database = reasons_in_database(db, &ids).await;
    // The leader shows what is committed: once every client has its
    // reply nothing is in flight, but a leader whose last group failed
    // may take a moment to reload.
    wait_shows(&replicas[leader], &in_database).await;
    let at_leader = in_database;
    for r in replicas.iter().filter(|r| r.process.is_some()) {
        wait_shows(r, &at_leader).await;
    }
    let whose = format!("leader {}", replicas[leader].node);
    for client in clients {
        client.check(&at_leader, &whose);
    }
}

fn summary(values: &mut [Duration]) -> String {
    values.sort();
    if values.is_empty() {
        return "none".into();
    }
    format!(
        "median {:?}, max {:?} over {}",
        percentile(values, 50.0),
        values[values.len() - 1],
        values.len()
    )
}

/// Acceptance 2: the leader SIGKILLed at random moments, 20 times, under
/// four clients writing through every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_change() {
    let db = TestDatabase::new().await;
    let (mut replicas, mut leader) = cluster(&db, 3, &[]).await;
    let mut rng = Rng(seed());
    let mut clients: Vec<BatchClient> = (0..4).map(|c| BatchClient::new(c, seed())).collect();
    register_batch_servers(replicas[leader].channel(), &clients).await;
    let channels: Vec<Channel> = replicas.iter().map(Replica::channel).collect();

    const ROUNDS: usize = 20;
    let mut failovers = Vec::new();
    let mut elections = Vec::new();
    for round in 0..ROUNDS {
        let progress = Arc::new(Progress::default());
        let tasks: Vec<_> = clients
            .drain(..)
            .map(|c| tokio::spawn(run_batch_client(channels.clone(), c, progress.clone())))
            .collect();
        // Kill after a random number of acknowledgements.
        let threshold = 5 + rng.below(60);
        let deadline = Instant::now() + CONVERGE;
        while progress.acks.load(Ordering::Relaxed) < threshold {
            assert!(
                Instant::now() < deadline,
                "round {round}: the clients make no progress"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let killed = leader;
        replicas[killed].kill().await;
        let kill_at = Instant::now();
        progress.set_mark(Some(kill_at));

        // A new leader, and a write acknowledged after the kill.
        let others: Vec<usize> = (0..replicas.len()).filter(|i| *i != killed).collect();
        leader = wait_for_leader_among(&replicas, &others, ELECTION).await;
        elections.push(kill_at.elapsed());
        let deadline = kill_at + ELECTION;
        let served = loop {
            if let Some(at) = *progress.first_ack_after_mark.lock().unwrap() {
                break at;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no write acknowledged within {ELECTION:?} of the kill; refused: {:?}",
                progress.refused_after_mark.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        failovers.push(served - kill_at);

        progress.stop.store(true, Ordering::Relaxed);
        for task in tasks {
            clients.push(task.await.expect("a client panicked"));
        }
        // The killed replica comes back as a follower.
        replicas[killed].restart().await;
        replicas[killed].wait_following(ELECTION).await;
        check_batch_clients(&db, &replicas, leader, &mut clients).await;
        eprintln!(
            "round {round}: killed {} after {threshold}+ acks; {} leads; first write after {:?}; \
             refused meanwhile: {:?}",
            replicas[killed].node,
            replicas[leader].node,
            served - kill_at,
            progress.refused_after_mark.lock().unwrap()
        );
    }
    let acked: u64 = clients.iter().map(|c| c.acked).sum();
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    for c in &clients {
        for (code, n) in &c.failed {
            *refused.entry(code.clone()).or_default() += n;
        }
    }
    let slowest = clients.iter().map(|c| c.slowest).max().unwrap_or_default();
    println!(
        "{ROUNDS} leader kills: failover (kill to first acknowledged write) {}; election (kill \
         to a leader in health) {}; {acked} batches acknowledged, refused {refused:?}, slowest \
         call {slowest:?}",
        summary(&mut failovers),
        summary(&mut elections),
    );
    assert!(acked >= ROUNDS as u64 * 5, "the clients made progress");
    for r in &mut replicas {
        r.terminate().await;
    }
}

// ------------------------------------------------------------ acceptance 3

/// Acceptance 3: a paused leader that lost its lease commits nothing
/// after it resumes, and becomes a follower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_commits_nothing_after_losing_its_lease() {
    let db = TestDatabase::new().await;
    let (mut replicas, old) = cluster(&db, 3, &[]).await;
    let ids: Vec<String> = (0..4).map(|i| format!("fence-{i}")).collect();
    register_ids(replicas[old].channel(), &ids).await;
    let mut at_old = ServersClient::new(replicas[old].channel());
    at_old
        .close_servers(close_all(&ids[0..1], "before the pause"))
        .await
        .expect("the leader takes writes");
    let (holder, old_epoch, _) = lease_row(&db).await;
    assert_eq!(holder, replicas[old].node);

    replicas[old].signal("-STOP");
    let stopped_at = Instant::now();
    // A write sent to the paused leader: it waits in its socket.
    let mut pending_client = at_old.clone();
    let pending_ids = ids[1..2].to_vec();
    let pending = tokio::spawn(async move {
        pending_client
            .close_servers(close_all(&pending_ids, "sent while paused"))
            .await
    });

    // Another replica takes over once the lease has expired.
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let new = wait_for_leader_among(&replicas, &others, ELECTION).await;
    let took_over = stopped_at.elapsed();
    let (holder, new_epoch, _) = lease_row(&db).await;
    assert_eq!(holder, replicas[new].node);
    assert!(
        new_epoch > old_epoch,
        "the new leader's epoch {new_epoch} follows {old_epoch}"
    );
    ServersClient::new(replicas[new].channel())
        .close_servers(close_all(&ids[2..3], "by the new leader"))
        .await
        .expect("the new leader takes writes");

    replicas[old].signal("-CONT");
    // Writes sent right after it resumes, before it can have noticed.
    let mut late = Vec::new();
    for k in 0..5 {
        let reason = format!("sent after resuming {k}");
        let result = at_old.close_servers(close_all(&ids[3..4], &reason)).await;
        late.push((reason, result));
        let _ = at_old.open_servers(open_all(&ids[3..4])).await;
    }
    let pending = pending.await.unwrap();

    // It steps down and follows.
    replicas[old].logged("lost leadership").await;
    replicas[old].logged("following").await;
    replicas[old].wait_following(ELECTION).await;

    // What the database holds: no change committed under the old epoch
    // after the new leader's first one.
    let client = db.connect().await;
    let row = client
        .query_one(
            "SELECT (SELECT max(seq) FROM dcv_broker_changes WHERE epoch = $1), \
                    (SELECT min(seq) FROM dcv_broker_changes WHERE epoch = $2)",
            &[&old_epoch, &new_epoch],
        )
        .await
        .unwrap();
    let (old_last, new_first): (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
    let new_first = new_first.expect("the new leader committed its close");
    assert!(
        old_last.is_none_or(|last| last < new_first),
        "the old leader committed seq {old_last:?} after the new leader's {new_first}"
    );
    let later_epochs: Vec<i64> = client
        .query(
            "SELECT DISTINCT epoch FROM dcv_broker_changes WHERE seq >= $1",
            &[&new_first],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        later_epochs.iter().all(|e| *e >= new_epoch),
        "changes under an older epoch after the takeover: {later_epochs:?}"
    );

    // Whatever the old leader acknowledged is in the database; what it
    // refused was refused as UNAVAILABLE.
    let in_db = reasons_in_database(&db, &ids).await;
    assert_eq!(in_db[&ids[0]].as_deref(), Some("before the pause"));
    assert_eq!(in_db[&ids[2]].as_deref(), Some("by the new leader"));
    match &pending {
        Ok(reply) => {
            assert!(reply.get_ref().unsuccessful_list.is_empty(), "{pending:?}");
            assert_eq!(
                in_db[&ids[1]].as_deref(),
                Some("sent while paused"),
                "the old leader acknowledged a write the database does not hold"
            );
        }
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
    }
    let mut acknowledged_late = 0;
    for (reason, result) in &late {
        match result {
            Ok(_) => {
                acknowledged_late += 1;
                // Forwarded to the new leader, so committed under its epoch.
                let n: i64 = client
                    .query_one(
                        "SELECT count(*) FROM dcv_broker_changes WHERE epoch >= $1 \
                         AND $2 = ANY(servers)",
                        &[&new_epoch, &ids[3]],
                    )
                    .await
                    .unwrap()
                    .get(0);
                assert!(
                    n > 0,
                    "{reason} acknowledged, but no change of the new epoch touches it"
                );
            }
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{reason}: {status:?}"),
        }
    }
    // The old leader's memory holds no uncommitted change: it shows what
    // the database holds (after its reload as a follower).
    let expected: BTreeMap<String, Option<String>> = reasons_in_database(&db, &ids).await;
    for r in &replicas {
        wait_shows(r, &expected).await;
    }
    println!(
        "paused leader {}: {} took over after {took_over:?} (epoch {old_epoch} -> {new_epoch}); \
         the write waiting in its socket: {}; {acknowledged_late} of {} writes sent after it \
         resumed acknowledged (forwarded)",
        replicas[old].node,
        replicas[new].node,
        match &pending {
            Ok(_) => "acknowledged (forwarded)".to_string(),
            Err(s) => format!("{:?}", s.code()),
        },
        late.len()
    );
    for r in &mut replicas {
        r.terminate().await;
    }
}

async fn register_ids(channel: Channel, ids: &[String]) {
    let mut agent = AgentClient::new(channel);
    for id in ids {
        agent.register_server(tagged(id, "plain", 4)).await.unwrap();
    }
}

// ------------------------------------------------------------ acceptance 4

/// Acceptance 4: PostgreSQL goes down (as in a crash) and comes back on
/// the same port while clients write through both replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_and_back_under_load_loses_nothing_and_needs_no_restart() {
    let mut db = TestDatabase::new().await;
    if !db.owns_server() {
        eprintln!(
            "skipped: DCV_BROKER_TEST_DATABASE_URL points at a server this test cannot stop and \
             restart"
        );
        return;
    }
    let (mut replicas, leader) = cluster(&db, 2, &[]).await;
    let mut clients: Vec<BatchClient> = (0..4).map(|c| BatchClient::new(c, seed())).collect();
    register_batch_servers(replicas[leader].channel(), &clients).await;
    let channels: Vec<Channel> = replicas.iter().map(Replica::channel).collect();
    // A server of no client's, for the test's own writes.
    let probe_ids = vec!["probe".to_string()];
    register_ids(replicas[leader].channel(), &probe_ids).await;

    for round in 0..2 {
        let progress = Arc::new(Progress::default());
        let tasks: Vec<_> = clients
            .drain(..)
            .map(|c| tokio::spawn(run_batch_client(channels.clone(), c, progress.clone())))
            .collect();
        let deadline = Instant::now() + CONVERGE;
        while progress.acks.load(Ordering::Relaxed) < 20 {
            assert!(Instant::now() < deadline, "the clients make no progress");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        db.crash_server();
        let down_at = Instant::now();

        // Every replica notices and says writes are not taken.
        for r in &mut replicas {
            r.logged("database unreachable").await;
        }
        for r in &replicas {
            let deadline = Instant::now() + ELECTION;
            while r.health(WRITES_HEALTH).await != Some(ServingStatus::NotServing) {
                assert!(
                    Instant::now() < deadline,
                    "{} still says it takes writes with the database down",
                    r.node
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(
                r.health("").await,
                Some(ServingStatus::Serving),
                "{}: reads still work, so the broker is SERVING overall",
                r.node
            );
        }
        // Now writes fail with UNAVAILABLE and reads answer, on both.
        progress.set_mark(Some(Instant::now()));
        for r in &replicas {
            let refused = ServersClient::new(r.channel())
                .close_servers(close_all(&probe_ids, "during the outage"))
                .await
                .expect_err("a write with the database down");
            assert_eq!(refused.code(), Code::Unavailable, "{}: {refused:?}", r.node);
            let read = shown(r.channel(), &probe_ids).await;
            assert!(
                read.is_ok_and(|s| s.len() == 1),
                "{} does not read during the outage",
                r.node
            );
        }
        // Let every client hit the outage a few times.
        let deadline = Instant::now() + CONVERGE;
        while progress
            .refused_after_mark
            .lock()
            .unwrap()
            .values()
            .sum::<u64>()
            < 12
        {
            assert!(
                Instant::now() < deadline,
                "the clients' writes are not refused"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let refused_during = progress.refused_after_mark.lock().unwrap().clone();
        let acked_during = progress.first_ack_after_mark.lock().unwrap().is_some();
        assert!(
            !acked_during,
            "a write sent while the database was down was acknowledged"
        );
        assert!(
            refused_during.keys().all(|code| code == "Unavailable"),
            "writes during the outage were refused with {refused_during:?}"
        );

        db.start_server().await;
        let up_at = Instant::now();
        for r in &mut replicas {
            r.logged("database reachable again").await;
        }
        // Writes work again through every replica, no broker restarted.
        progress.set_mark(Some(Instant::now()));
        for r in &replicas {
            let deadline = Instant::now() + ELECTION;
            let reason = format!("after outage {round} through {}", r.node);
            loop {
                let result = ServersClient::new(r.channel())
                    .close_servers(close_all(&probe_ids, &reason))
                    .await;
                match result {
                    Ok(_) => {
                        let seen = reasons_shown(r.channel(), &probe_ids).await.unwrap();
                        assert_eq!(seen["probe"].as_deref(), Some(reason.as_str()));
                        ServersClient::new(r.channel())
                            .open_servers(open_all(&probe_ids))
                            .await
                            .expect("an open right after a close");
                        break;
                    }
                    Err(status) => assert!(
                        Instant::now() < deadline,
                        "{} takes no write after the database returned: {status:?}",
                        r.node
                    ),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let deadline = Instant::now() + ELECTION;
        while progress.first_ack_after_mark.lock().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "the clients' writes do not resume"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let resumed = up_at.elapsed();
        progress.stop.store(true, Ordering::Relaxed);
        for task in tasks {
            clients.push(task.await.expect("a client panicked"));
        }
        let leader = wait_for_leader(&replicas, ELECTION).await;
        check_batch_clients(&db, &replicas, leader, &mut clients).await;
        println!(
            "round {round}: database down for {:?}; writes refused meanwhile {refused_during:?}; \
             clients' writes resumed {resumed:?} after it returned",
            up_at - down_at
        );
    }
    for r in &replicas {
        assert!(r.process.is_some(), "no broker was restarted");
    }
    for r in &mut replicas {
        r.terminate().await;
    }
}

// ------------------------------------------------------------ acceptance 5

/// Servers in the placement race; each takes up to four sessions.
const RACE_SERVERS: usize = 24;
const RACE_ROUNDS: usize = 4;
const CREATORS: usize = 3;
const CREATE_CALLS: usize = 40;
const CLOSE_CALLS: usize = 40;

/// Acceptance 5: closes without Force through one replica race
/// placements through the other two, in rounds. Within a round no server
/// is opened, so a closed server can hold a session only if a placement
/// landed after its close, or a close without Force ignored a placement in
/// flight: at the end of a round no closed server may hold a live session
/// (checked on the leader, in the database, and every follower shows the
/// same servers). Between rounds every session is deleted (the agents
/// confirm) and every server opened, so each round races anew on empty
/// servers, which is where Spread places and where a close can succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placements_through_followers_never_land_on_servers_closed_through_another() {
    let db = TestDatabase::new().await;
    let (mut replicas, leader) = cluster(&db, 3, &[]).await;
    let ids: Vec<String> = (0..RACE_SERVERS).map(|i| format!("race-{i:02}")).collect();
    // Agents on every replica, confirming each creation and deletion they
    // are sent, so that placements in flight and confirmed sessions both
    // occupy, and deleted sessions leave.
    let mut agents = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let through = &replicas[i % 3];
        let agent = TestAgent::connect_to(through.addr, tagged(id, "race", 4)).await;
        agents.push(tokio::spawn(confirm_instructions(agent)));
    }
    let closer_at = (leader + 1) % 3;
    let creators_at: Vec<usize> = (0..3).filter(|i| *i != closer_at).collect();
    let leader_channel = replicas[leader].channel();

    let mut rng = Rng(seed());
    let (mut placed, mut no_server, mut closed_ok, mut refused, mut closed_total) = (0, 0, 0, 0, 0);
    for round in 0..RACE_ROUNDS {
        let mut tasks = Vec::new();
        for c in 0..CREATORS {
            let channel = replicas[creators_at[c % creators_at.len()]].channel();
            tasks.push(tokio::spawn(race_creator(channel, round, c)));
        }
        let closes: Vec<String> = (0..CLOSE_CALLS)
            .map(|_| ids[rng.below(RACE_SERVERS as u64) as usize].clone())
            .collect();
        let closer = tokio::spawn(race_closer(replicas[closer_at].channel(), closes));
        for task in tasks {
            let (p, n) = task.await.expect("a creator panicked");
            placed += p;
            no_server += n;
        }
        let (ok, no) = closer.await.expect("the closer panicked");
        closed_ok += ok;
        refused += no;

        // Judge the round.
        let servers = shown(leader_channel.clone(), &ids).await.unwrap();
        let closed: BTreeSet<String> = servers
            .iter()
            .filter(|s| !s.holds.is_empty())
            .map(|s| s.id.clone())
            .collect();
        closed_total += closed.len();
        let sessions = all_sessions(leader_channel.clone()).await;
        let on_closed: Vec<String> = sessions
            .iter()
            .filter(|s| s.state != pb::SessionState::Deleted as i32)
            .filter_map(|s| {
                let server = s.server.as_ref()?.id.clone();
                closed
                    .contains(&server)
                    .then(|| format!("{} ({:?}) on closed {server}", s.id, s.state))
            })
            .collect();
        assert!(
            on_closed.is_empty(),
            "round {round}: sessions on servers closed without Force: {on_closed:#?}"
        );
        let rows = db
            .connect()
            .await
            .query(
                "SELECT s.id, s.server_id FROM sessions s \
                 JOIN holds h ON h.server_id = s.server_id WHERE s.state <> 'DELETED'",
                &[],
            )
            .await
            .unwrap();
        assert!(
            rows.is_empty(),
            "round {round}: the database has {} live sessions on closed servers",
            rows.len()
        );
        let expected: BTreeMap<String, Option<String>> = servers
            .iter()
            .map(|s| (s.id.clone(), hold_reason(s)))
            .collect();
        for r in &replicas {
            wait_shows(r, &expected).await;
        }

        // Empty and open everything for the next round.
        let live: Vec<pb::DeleteSessionRequestData> = sessions
            .iter()
            .filter(|s| s.state != pb::SessionState::Deleted as i32)
            .map(|s| pb::DeleteSessionRequestData {
                session_id: s.id.clone(),
                owner: s.owner.clone(),
                force: Some(true),
            })
            .collect();
        let mut deleter = SessionsClient::new(replicas[creators_at[0]].channel());
        for chunk in live.chunks(50) {
            let reply = deleter
                .delete_sessions(pb::DeleteSessionsRequest {
                    sessions: chunk.to_vec(),
                    ..Default::default()
                })
                .await
                .expect("DeleteSessions through a follower")
                .into_inner();
            assert!(reply.unsuccessful_list.is_empty(), "{reply:?}");
        }
        let deadline = Instant::now() + CONVERGE;
        loop {
            let left = all_sessions(leader_channel.clone())
                .await
                .into_iter()
                .filter(|s| s.state != pb::SessionState::Deleted as i32)
                .count();
            if left == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{left} sessions are not deleted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ServersClient::new(replicas[closer_at].channel())
            .open_servers(open_all(&ids))
            .await
            .expect("OpenServers through a follower");
    }
    println!(
        "placement race across replicas, {RACE_ROUNDS} rounds: {placed} sessions placed, \
         {no_server} NO_SERVER_AVAILABLE, {closed_ok} closes without Force succeeded \
         ({closed_total} servers closed at the rounds' ends), {refused} refused for running \
         sessions"
    );
    // The run really raced.
    assert!(placed > 0, "nothing was placed");
    assert!(closed_ok > 0, "no close succeeded");
    assert!(refused > 0, "no close was refused for a session");
    assert!(
        no_server > 0,
        "no creation found every server closed or full"
    );
    for agent in agents {
        agent.abort();
    }
    for r in &mut replicas {
        r.terminate().await;
    }
}

/// Confirms every creation and deletion the agent is sent, until its
/// stream ends.
async fn confirm_instructions(mut agent: TestAgent) {
    while let Ok(Some(message)) = agent.stream.message().await {
        let (session_id, kind, state) = match message.instruction {
            Some(Instr::CreateSession(c)) => (
                c.session_id,
                pb::InstructionKind::CreateSession,
                pb::SessionState::Ready,
            ),
            Some(Instr::DeleteSession(d)) => (
                d.session_id,
                pb::InstructionKind::DeleteSession,
                pb::SessionState::Deleted,
            ),
            _ => continue,
        };
        let _ = agent
            .client
            .report_instruction_result(pb::ReportInstructionResultRequest {
                server_id: agent.id.clone(),
                session_id,
                kind: kind as i32,
                success: true,
                session_state: state as i32,
                ..Default::default()
            })
            .await;
    }
}

/// Creates single sessions (each a new owner, so none is refused for the
/// per-user limit); returns (placed, NO_SERVER_AVAILABLE).
async fn race_creator(channel: Channel, round: usize, c: usize) -> (usize, usize) {
    let mut sessions = SessionsClient::new(channel);
    let (mut placed, mut none) = (0, 0);
    for k in 0..CREATE_CALLS {
        let mut item = create_item(
            &format!("race-{round}-{c}-{k}"),
            &format!("u{round}-{c}-{k}"),
            pb::SessionType::Virtual,
        );
        item.requirements = "tag:cluster = 'race'".into();
        let reply = sessions
            .create_sessions(create_req(vec![item]))
            .await
            .unwrap_or_else(|e| panic!("CreateSessions through a follower: {e:?}"))
            .into_inner();
        placed += reply.successful_list.len();
        for f in reply.unsuccessful_list {
            assert_eq!(
                f.failure_code,
                FailureCode::NoServerAvailable as i32,
                "{}",
                f.failure_reason
            );
            none += 1;
        }
    }
    (placed, none)
}

/// Closes each server of `order` without Force; returns (succeeded,
/// refused for running sessions).
async fn race_closer(channel: Channel, order: Vec<String>) -> (usize, usize) {
    let mut servers = ServersClient::new(channel);
    let (mut ok, mut refused) = (0, 0);
    for id in order {
        let reply = servers
            .close_servers(close_req(vec![close_item(&id, Some(false), "race")]))
            .await
            .unwrap_or_else(|e| panic!("CloseServers: {e:?}"))
            .into_inner();
        ok += reply.successful_list.len();
        for f in reply.unsuccessful_list {
            assert_eq!(
                f.failure_code,
                FailureCode::DcvServerHasRunningSessions as i32,
                "{}",
                f.failure_reason
            );
            refused += 1;
        }
    }
    (ok, refused)
}

/// Every session `channel`'s replica shows, page by page.
async fn all_sessions(channel: Channel) -> Vec<pb::Session> {
    let mut sessions = SessionsClient::new(channel);
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = sessions
            .describe_sessions(pb::DescribeSessionsRequest {
                next_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        all.extend(page.sessions);
        if page.next_token.is_empty() {
            return all;
        }
        token = page.next_token;
    }
}

// ------------------------------------------------------------ the harness

/// The harness acceptance 4 stands on: the test's own PostgreSQL stops (as
/// in a crash, or cleanly) and starts again at the same URL with what was
/// committed before.
#[tokio::test]
async fn the_test_postgres_restarts_at_the_same_url_keeping_commits() {
    let mut db = TestDatabase::new().await;
    if !db.owns_server() {
        eprintln!("skipped: DCV_BROKER_TEST_DATABASE_URL's server is not this test's to stop");
        return;
    }
    db.execute("CREATE TABLE kept (n INTEGER); INSERT INTO kept VALUES (1)")
        .await;
    let first = db.server_pid();
    db.crash_server();
    assert!(
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls)
            .await
            .is_err(),
        "the server is down"
    );
    db.start_server().await;
    assert_ne!(db.server_pid(), first, "a new server process");
    db.execute("INSERT INTO kept VALUES (2)").await;
    db.stop_server();
    db.start_server().await;
    let n: i64 = db
        .connect()
        .await
        .query_one("SELECT count(*) FROM kept", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "both commits survive a crash and a clean stop");
}
