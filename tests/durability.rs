//! Durability of the real `dcv-broker` binary with its default store:
//! acknowledged changes survive SIGKILL at random moments, batches are
//! never half-applied, closed state (reason, actor, time) survives clean
//! and unclean restarts and re-registration, as do named holds (their
//! expiries) and state versions, and queued sessions come back.
//! The SIGKILL test runs on PostgreSQL (`--database-url`) too.

mod common;

use std::{
    ffi::OsStr,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use common::process::{BROKER_BIN as BIN, BrokerProcess};
use dcv_broker::pb::{
    self, agent_client::AgentClient, servers_client::ServersClient, sessions_client::SessionsClient,
};
use tonic::transport::Channel;

/// A broker process on a data directory.
struct Proc(BrokerProcess);

/// Where a broker keeps its state.
enum StoreAt {
    /// The SQLite store in a data directory.
    Dir(std::path::PathBuf),
    /// A PostgreSQL database (`--database-url`); the data directory holds
    /// only the admin socket.
    Postgres(String, std::path::PathBuf),
}

impl StoreAt {
    async fn start(&self) -> Proc {
        match self {
            StoreAt::Dir(dir) => Proc::start(dir).await,
            // The same --node-id at every start, as a replica's service
            // unit would give it: the restarted broker takes back its own
            // lease at once rather than wait for it to lapse.
            StoreAt::Postgres(url, dir) => {
                let args = ["--database-url", url, "--node-id", "durability"];
                Proc::start_with(dir, &args.map(OsStr::new)).await
            }
        }
    }
}

impl Proc {
    async fn start(dir: &Path) -> Proc {
        Proc::start_with(dir, &[]).await
    }

    async fn start_with(dir: &Path, extra: &[&OsStr]) -> Proc {
        let mut args: Vec<&OsStr> = [
            "--log",
            "warn",
            "--queue-max-size",
            "100000",
            // The test's clients all come from 127.0.0.1: one client to
            // the rate limit, which would refuse the load they make.
            "--client-rate",
            "0",
            "--data-dir",
        ]
        .map(OsStr::new)
        .to_vec();
        args.push(dir.as_os_str());
        args.extend_from_slice(extra);
        Proc(BrokerProcess::start_exactly(&args).await)
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.0.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// SIGKILL: no drain, no flush.
    async fn kill(mut self) {
        self.0.signal("-KILL");
        self.0.exited().await;
    }

    /// SIGTERM, and a clean exit.
    async fn stop(self) {
        self.0.terminate().await;
    }
}

fn registration(id: &str, ip: &str) -> pb::RegisterServerRequest {
    pb::RegisterServerRequest {
        server_id: id.into(),
        ip: ip.into(),
        host: Some(pb::Host {
            os: Some(pb::Os {
                family: "linux".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        max_virtual_sessions: 4,
        ..Default::default()
    }
}

async fn describe(servers: &mut ServersClient<Channel>, ids: &[String]) -> Vec<pb::Server> {
    servers
        .describe_servers(pb::DescribeServersRequest {
            server_ids: ids.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .servers
}

/// A tiny deterministic generator (SplitMix64), seeded per run.
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

/// What one client knows it got acknowledged.
#[derive(Debug, Default, Clone)]
struct ServerClient {
    /// Its servers: all closed or all opened by each of its batches.
    ids: Vec<String>,
    /// Operations acknowledged so far (op k closes when k is even, with
    /// reason `op-k`, and opens when k is odd).
    acked: u64,
    /// An operation was sent and not acknowledged when the broker died.
    in_flight: bool,
}

/// Alternately closes and opens its servers, one batch per operation,
/// until the broker dies.
async fn run_server_client(
    channel: Channel,
    mut client: ServerClient,
    acks: Arc<AtomicU64>,
) -> ServerClient {
    let mut servers = ServersClient::new(channel);
    loop {
        let k = client.acked;
        client.in_flight = true;
        let result = if k.is_multiple_of(2) {
            servers
                .close_servers(pb::CloseServersRequest {
                    servers: client
                        .ids
                        .iter()
                        .map(|id| pb::CloseServerRequestData {
                            server_id: id.clone(),
                            force: Some(true),
                            reason: format!("op-{k}"),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().unsuccessful_list.len())
        } else {
            servers
                .open_servers(pb::OpenServersRequest {
                    servers: client
                        .ids
                        .iter()
                        .map(|id| pb::OpenServerRequestData {
                            server_id: id.clone(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().unsuccessful_list.len())
        };
        match result {
            Ok(failed) => {
                assert_eq!(failed, 0, "every item of op {k} applies");
                client.acked += 1;
                client.in_flight = false;
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => return client,
        }
    }
}

/// Checks that a client's servers show the state after `acked` or (if one
/// was in flight) `acked + 1` operations, all of them the same one.
fn check_server_client(client: &ServerClient, shown: &[pb::Server]) {
    assert_eq!(shown.len(), client.ids.len(), "every server survives");
    let state = |s: &pb::Server| s.holds.first().map(|h| h.reason.clone());
    let first = state(&shown[0]);
    for s in shown {
        assert_eq!(state(s), first, "half-applied batch: {shown:#?}");
    }
    let expected = |applied: u64| {
        (applied > 0 && (applied - 1).is_multiple_of(2)).then(|| format!("op-{}", applied - 1))
    };
    let allowed: Vec<Option<String>> = if client.in_flight {
        vec![expected(client.acked), expected(client.acked + 1)]
    } else {
        vec![expected(client.acked)]
    };
    assert!(
        allowed.contains(&first),
        "acknowledged {} ops (in flight: {}), but the store shows {first:?}",
        client.acked,
        client.in_flight
    );
}

/// Creates queued sessions and deletes some, until the broker dies.
#[derive(Debug, Default, Clone)]
struct SessionClient {
    created: Vec<String>,
    deleted: Vec<String>,
    /// A deletion sent and not acknowledged when the broker died.
    deleting: Option<String>,
    next: u64,
}

async fn run_session_client(
    channel: Channel,
    mut client: SessionClient,
    acks: Arc<AtomicU64>,
) -> SessionClient {
    let mut sessions = SessionsClient::new(channel);
    loop {
        client.next += 1;
        if client.next.is_multiple_of(3) && client.created.len() > client.deleted.len() {
            let id = client.created[client.deleted.len()].clone();
            client.deleting = Some(id.clone());
            let r = sessions
                .delete_sessions(pb::DeleteSessionsRequest {
                    sessions: vec![pb::DeleteSessionRequestData {
                        session_id: id.clone(),
                        owner: "crash".into(),
                        force: None,
                    }],
                    ..Default::default()
                })
                .await;
            match r {
                Ok(r) => {
                    assert_eq!(r.into_inner().successful_list.len(), 1);
                    client.deleted.push(id);
                    client.deleting = None;
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => return client,
            }
        } else {
            // Nothing matches: the session waits in the queue.
            let r = sessions
                .create_sessions(pb::CreateSessionsRequest {
                    sessions: vec![pb::CreateSessionRequestData {
                        name: format!("s{}", client.next),
                        owner: "crash".into(),
                        r#type: pb::SessionType::Virtual as i32,
                        enqueue_request: true,
                        requirements: "tag:nowhere = 'true'".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .await;
            match r {
                Ok(r) => {
                    let r = r.into_inner();
                    assert_eq!(r.successful_list.len(), 1, "{r:?}");
                    client.created.push(r.successful_list[0].id.clone());
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => return client,
            }
        }
    }
}

async fn check_session_client(channel: Channel, client: &mut SessionClient) {
    let mut sessions = SessionsClient::new(channel);
    let mut shown = std::collections::HashMap::new();
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
        for s in page.sessions {
            shown.insert(s.id.clone(), s.state);
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    for id in &client.created {
        let state = shown
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged session {id} was lost"));
        if client.deleted.contains(id) {
            assert_eq!(
                *state,
                pb::SessionState::Deleted as i32,
                "deletion of {id} lost"
            );
        } else if client.deleting.as_ref() != Some(id) {
            assert_eq!(
                *state,
                pb::SessionState::Creating as i32,
                "{id} still queued"
            );
        }
    }
    // The deletion in flight either applied or not; go on from what is.
    if let Some(id) = client.deleting.take()
        && shown.get(&id) == Some(&(pb::SessionState::Deleted as i32))
    {
        client.deleted.push(id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_sigkill_at_random_moments() {
    let dir = tempdir();
    sigkill_at_random_moments(StoreAt::Dir(dir.path().to_path_buf())).await;
}

/// The same with the state in PostgreSQL (a throwaway server of the
/// test's own, or `DCV_BROKER_TEST_DATABASE_URL`'s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_sigkill_at_random_moments_on_postgres() {
    let db = common::postgres::TestDatabase::new().await;
    let dir = tempdir();
    sigkill_at_random_moments(StoreAt::Postgres(db.url.clone(), dir.path().to_path_buf())).await;
}

async fn sigkill_at_random_moments(store: StoreAt) {
    let seed = std::env::var("DURABILITY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_u64);
    let mut rng = Rng(seed);
    let mut broker = store.start().await;

    // Four clients, five servers each, registered (durably) up front.
    let mut clients: Vec<ServerClient> = (0..4)
        .map(|c| ServerClient {
            ids: (0..5).map(|i| format!("crash-{c}-{i}")).collect(),
            ..Default::default()
        })
        .collect();
    let mut agent = AgentClient::new(broker.channel().await);
    for id in clients.iter().flat_map(|c| c.ids.iter()) {
        agent
            .register_server(registration(id, "192.0.2.1"))
            .await
            .unwrap();
    }
    let mut session_client = SessionClient::default();

    let cycles = 12;
    let mut total_acks = 0;
    for cycle in 0..cycles {
        let acks = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for client in clients.drain(..) {
            tasks.push(tokio::spawn(run_server_client(
                broker.channel().await,
                client,
                acks.clone(),
            )));
        }
        let sessions = tokio::spawn(run_session_client(
            broker.channel().await,
            session_client.clone(),
            acks.clone(),
        ));
        // Kill after a random number of acknowledgements.
        let threshold = 5 + rng.below(80);
        let progress = tokio::time::timeout(common::process::PATIENCE, async {
            while acks.load(Ordering::Relaxed) < threshold {
                tokio::task::yield_now().await;
            }
        });
        assert!(
            progress.await.is_ok(),
            "cycle {cycle}: the clients stopped at {} acknowledgements, short of {threshold}",
            acks.load(Ordering::Relaxed)
        );
        broker.kill().await;
        for task in tasks {
            clients.push(task.await.unwrap());
        }
        session_client = sessions.await.unwrap();
        total_acks += acks.load(Ordering::Relaxed);

        broker = store.start().await;
        let mut servers = ServersClient::new(broker.channel().await);
        for client in &clients {
            let shown = describe(&mut servers, &client.ids).await;
            check_server_client(client, &shown);
        }
        check_session_client(broker.channel().await, &mut session_client).await;
        // Settle what was in flight: the next cycle starts from what the
        // store shows.
        for client in &mut clients {
            let shown = describe(&mut servers, &client.ids).await;
            let reason = shown[0].holds.first().map(|h| h.reason.clone());
            if client.in_flight {
                let applied_next = match (&reason, client.acked % 2) {
                    (Some(_), 0) => true, // the close in flight applied
                    (None, 1) => true,    // the open in flight applied
                    _ => false,
                };
                if applied_next {
                    client.acked += 1;
                }
                client.in_flight = false;
            }
        }
        eprintln!("cycle {cycle}: killed after {threshold}+ acks");
    }
    assert!(total_acks >= cycles * 5, "the clients made progress");
    broker.stop().await;
}

#[tokio::test]
async fn closed_state_survives_clean_and_unclean_restarts_and_re_registration() {
    let dir = tempdir();
    let broker = Proc::start(dir.path()).await;
    let mut agent = AgentClient::new(broker.channel().await);
    for id in ["clean", "unclean", "open"] {
        agent
            .register_server(registration(id, "192.0.2.1"))
            .await
            .unwrap();
    }
    let mut servers = ServersClient::new(broker.channel().await);
    let close = |id: &str, reason: &str| pb::CloseServersRequest {
        servers: vec![pb::CloseServerRequestData {
            server_id: id.into(),
            force: None,
            reason: reason.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    servers
        .close_servers(close("clean", "kernel patch"))
        .await
        .unwrap();
    let before = describe(&mut servers, &["clean".into()]).await;

    // A clean restart.
    broker.stop().await;
    let broker = Proc::start(dir.path()).await;
    let mut servers = ServersClient::new(broker.channel().await);
    let after = describe(&mut servers, &["clean".into(), "open".into()]).await;
    assert_eq!(
        after[0].holds, before[0].holds,
        "reason, actor and time survive"
    );
    assert_eq!(after[0].holds[0].reason, "kernel patch");
    assert_eq!(after[0].holds[0].actor, "anonymous");
    assert_eq!(
        after[0].unavailability_reasons,
        vec![pb::UnavailabilityReason::ServerClosed as i32],
        "a fresh heartbeat window after a restart"
    );
    assert!(after[1].holds.is_empty());
    assert_eq!(after[0].registration_time, before[0].registration_time);

    // An unclean one.
    servers
        .close_servers(close("unclean", "disk swap"))
        .await
        .unwrap();
    let before = describe(&mut servers, &["unclean".into()]).await;
    broker.kill().await;
    let broker = Proc::start(dir.path()).await;
    let mut servers = ServersClient::new(broker.channel().await);
    let after = describe(&mut servers, &["unclean".into()]).await;
    assert_eq!(after[0].holds, before[0].holds);

    // The agent comes back from another address: still closed.
    let mut agent = AgentClient::new(broker.channel().await);
    agent
        .register_server(registration("unclean", "198.51.100.9"))
        .await
        .unwrap();
    let after = describe(&mut servers, &["unclean".into()]).await;
    assert_eq!(after[0].ip, "198.51.100.9");
    assert_eq!(after[0].holds, before[0].holds);
    broker.stop().await;
    let broker = Proc::start(dir.path()).await;
    let mut servers = ServersClient::new(broker.channel().await);
    let after = describe(&mut servers, &["unclean".into()]).await;
    assert_eq!(
        after[0].ip, "198.51.100.9",
        "the re-registration was stored"
    );
    assert_eq!(after[0].holds, before[0].holds);
}

/// Named holds survive clean and unclean restarts whole: each hold's name,
/// expiry, actor, time and reason, and the server's StateVersion, which an
/// ExpectedStateVersion read before the restart still matches after it.
#[tokio::test]
async fn named_holds_and_state_versions_survive_restarts() {
    let dir = tempdir();
    let broker = Proc::start(dir.path()).await;
    AgentClient::new(broker.channel().await)
        .register_server(registration("held", "192.0.2.1"))
        .await
        .unwrap();
    let mut servers = ServersClient::new(broker.channel().await);
    let close = |name: &str, reason: &str, expires_in: Option<u64>| pb::CloseServersRequest {
        servers: vec![pb::CloseServerRequestData {
            server_id: "held".into(),
            reason: reason.into(),
            hold_name: Some(name.into()),
            expires_in: expires_in.map(|seconds| prost_types::Duration {
                seconds: seconds as i64,
                nanos: 0,
            }),
            ..Default::default()
        }],
        ..Default::default()
    };
    for request in [
        close("team:db-7", "reindex", Some(3600)),
        close("alice", "kernel patch", None),
    ] {
        let reply = servers.close_servers(request).await.unwrap().into_inner();
        assert!(reply.unsuccessful_list.is_empty(), "{reply:?}");
    }
    let before = describe(&mut servers, &["held".into()]).await.remove(0);
    let names: Vec<&str> = before.holds.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["team:db-7", "alice"]);
    assert!(before.holds[0].expiration_time.is_some());
    assert!(before.holds[1].expiration_time.is_none());
    assert!(before.state_version > 0);

    let check = |after: &pb::Server, when: &str| {
        assert_eq!(after.holds, before.holds, "holds after {when}");
        assert_eq!(after.state_version, before.state_version, "after {when}");
    };
    broker.stop().await;
    let broker = Proc::start(dir.path()).await;
    let mut servers = ServersClient::new(broker.channel().await);
    check(
        &describe(&mut servers, &["held".into()]).await[0],
        "a clean restart",
    );
    broker.kill().await;
    let broker = Proc::start(dir.path()).await;
    let mut servers = ServersClient::new(broker.channel().await);
    check(
        &describe(&mut servers, &["held".into()]).await[0],
        "SIGKILL",
    );

    // The version read before the restarts still guards an open, and the
    // next version is new.
    let reply = servers
        .open_servers(pb::OpenServersRequest {
            servers: vec![pb::OpenServerRequestData {
                server_id: "held".into(),
                hold_name: Some("alice".into()),
                expected_state_version: Some(before.state_version),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<i32> = reply
        .unsuccessful_list
        .iter()
        .map(|u| u.failure_code)
        .collect();
    assert_eq!(
        codes,
        [pb::FailureCode::HoldsRemain as i32],
        "removed, and only the other hold keeps it closed: {reply:?}"
    );
    let after = describe(&mut servers, &["held".into()]).await.remove(0);
    assert_eq!(after.holds, before.holds[..1]);
    assert!(after.state_version > before.state_version);
    broker.stop().await;
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let dir = std::env::temp_dir().join(format!("dcv-broker-test-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// Runs the broker on `dir`, expecting it to refuse to start.
fn refused(dir: &Path) -> String {
    let child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A watchdog, not synchronisation: a broker that wrongly starts would
    // otherwise hang the test instead of failing it.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(30));
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    });
    drop(watchdog);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "a bad store stops the broker");
    assert!(out.stdout.is_empty(), "it never listened");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// Multi-threaded: `refused` blocks this thread while a running broker's
// log is still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_bad_store_stops_the_binary_with_a_clear_message_and_is_left_alone() {
    // Garbage where the store should be.
    let dir = tempdir();
    let file = dir.path().join("broker.sqlite3");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&file, &garbage).unwrap();
    let message = refused(dir.path());
    assert!(message.contains("is not a dcv-broker store"), "{message}");
    assert!(message.contains("broker.sqlite3"), "{message}");
    assert_eq!(std::fs::read(&file).unwrap(), garbage, "left untouched");

    // A store from a newer broker.
    let dir = tempdir();
    Proc::start(dir.path()).await.stop().await;
    let file = dir.path().join("broker.sqlite3");
    {
        let db = rusqlite::Connection::open(&file).unwrap();
        db.pragma_update(None, "user_version", 999).unwrap();
    }
    let before = std::fs::read(&file).unwrap();
    let message = refused(dir.path());
    assert!(message.contains("schema version 999"), "{message}");
    assert_eq!(std::fs::read(&file).unwrap(), before, "left untouched");

    // A truncated store: one with data, checkpointed by a clean stop
    // into the main file, then cut in half.
    let dir = tempdir();
    let broker = Proc::start(dir.path()).await;
    let mut agent = AgentClient::new(broker.channel().await);
    for i in 0..1000 {
        agent
            .register_server(registration(&format!("t-{i}"), "192.0.2.1"))
            .await
            .unwrap();
    }
    broker.stop().await;
    let file = dir.path().join("broker.sqlite3");
    let whole = std::fs::read(&file).unwrap();
    assert!(whole.len() > 32 * 1024, "the data reached the main file");
    std::fs::write(&file, &whole[..whole.len() / 2]).unwrap();
    let message = refused(dir.path());
    assert!(message.contains("broker.sqlite3"), "{message}");
    assert_eq!(std::fs::read(&file).unwrap(), &whole[..whole.len() / 2]);

    // A store in a directory the broker may not write (as root, run it as
    // nobody, for whom the permission bits apply).
    let dir = tempdir();
    Proc::start(dir.path()).await.stop().await;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.path().join("broker.sqlite3");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The temp dir's parents must be reachable by nobody.
    let before = std::fs::read(&file).unwrap();
    let as_root = running_as_root();
    let mut command = if as_root {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    let out = command
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{message}");
    assert!(
        message.contains("broker.sqlite3") || message.contains(&*dir.path().to_string_lossy()),
        "{message}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), before, "left untouched");

    // A store another broker is using.
    let dir = tempdir();
    let running = Proc::start(dir.path()).await;
    let message = refused(dir.path());
    assert!(
        message.contains("in use by another dcv-broker"),
        "{message}"
    );
    running.stop().await;
}

/// Whether the tests run as root (CI does), read from `id -u`.
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
