//! The real agent binary (`dcv-broker-agent`) against the real broker
//! binary, driving the fake `dcv` of tests/fixtures: the host joins the
//! fleet with its facts and tags, sessions are created and deleted through
//! `dcv`, the agent and the broker survive each other's crashes and
//! restarts without an operator, a `dcv` that hangs or fails costs one
//! instruction and not the agent, and bad configurations stop it with one
//! line. Every wait is on a log line, on the fake's calls.log or on bounded
//! polling of DescribeServers / DescribeSessions.
//!
//! need the broker side of screenshots, connection counts and the HTTP
//! token verifier, built on other branches.

mod common;

use std::{net::SocketAddr, time::Duration};

use base64::Engine;
use common::{
    agent_process::{AgentHome, AgentProcess, TempDir, run_agent},
    process::{BrokerProcess, PATIENCE},
};
use dcv_broker::pb::{self, servers_client::ServersClient, sessions_client::SessionsClient};
use tonic::transport::Channel;

/// How often a test asks the broker again while it waits for a state.
const POLL: Duration = Duration::from_millis(100);

/// The broker's flags in these tests: heartbeats every second, so that
/// what the agent reports shows within a second or two.
const BROKER_FLAGS: [&str; 4] = ["--heartbeat-interval", "1s", "--log", "info"];

async fn start_broker() -> BrokerProcess {
    let mut args = vec!["--in-memory"];
    args.extend(BROKER_FLAGS);
    BrokerProcess::start_exactly(&args).await
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(url(addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn servers(addr: SocketAddr) -> ServersClient<Channel> {
    ServersClient::new(channel(addr).await)
}

async fn sessions(addr: SocketAddr) -> SessionsClient<Channel> {
    SessionsClient::new(channel(addr).await)
}

async fn all_servers(addr: SocketAddr) -> Vec<pb::Server> {
    servers(addr)
        .await
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .servers
}

/// Fetches with `fetch` until what it finds satisfies `ok` (bounded by
/// PATIENCE); a failed call or nothing found counts as not yet.
async fn poll_until<T: std::fmt::Debug, F: Future<Output = Option<T>>>(
    what: &str,
    fetch: impl Fn() -> F,
    ok: impl Fn(&T) -> bool,
) -> T {
    let mut last = None;
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Some(item) = fetch().await {
                if ok(&item) {
                    return item;
                }
                last = Some(item);
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{what}; last seen {last:#?}"))
}

/// Polls DescribeServers until server `id` satisfies `ok` (bounded).
async fn server_where(
    addr: SocketAddr,
    id: &str,
    what: &str,
    ok: impl Fn(&pb::Server) -> bool,
) -> pb::Server {
    let fetch = || async move {
        let reply = servers(addr)
            .await
            .describe_servers(pb::DescribeServersRequest {
                server_ids: vec![id.to_string()],
                ..Default::default()
            })
            .await
            .ok()?;
        reply.into_inner().servers.into_iter().next()
    };
    poll_until(&format!("server {id} never {what}"), fetch, ok).await
}

/// Polls DescribeSessions until session `id` satisfies `ok` (bounded).
async fn session_where(
    addr: SocketAddr,
    id: &str,
    what: &str,
    ok: impl Fn(&pb::Session) -> bool,
) -> pb::Session {
    let fetch = || async move {
        let reply = sessions(addr)
            .await
            .describe_sessions(pb::DescribeSessionsRequest {
                session_ids: vec![id.to_string()],
                ..Default::default()
            })
            .await
            .ok()?;
        reply.into_inner().sessions.into_iter().next()
    };
    poll_until(&format!("session {id} never {what}"), fetch, ok).await
}

/// Starts the agent on `home` and waits until its server takes sessions
/// (registered, its DCV server found healthy); returns the server id.
async fn join(addr: SocketAddr, home: &AgentHome) -> (AgentProcess, String) {
    let (agent, id) = AgentProcess::start_registered(home).await;
    available(addr, &id).await;
    (agent, id)
}

async fn available(addr: SocketAddr, id: &str) -> pb::Server {
    server_where(addr, id, "AVAILABLE", |s| {
        s.availability == pb::Availability::Available as i32
    })
    .await
}

async fn ready(addr: SocketAddr, id: &str) -> pb::Session {
    session_where(addr, id, "READY", |s| {
        s.state == pb::SessionState::Ready as i32
    })
    .await
}

/// A user name that exists on this host, for sessions' owners.
fn owner() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("id runs");
    let name = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!name.is_empty());
    name
}

fn virtual_session(name: &str) -> pb::CreateSessionRequestData {
    pb::CreateSessionRequestData {
        name: name.into(),
        owner: owner(),
        r#type: pb::SessionType::Virtual as i32,
        ..Default::default()
    }
}

/// CreateSessions of one item, which the broker must accept; its id.
async fn create(addr: SocketAddr, item: pb::CreateSessionRequestData) -> String {
    let reply = sessions(addr)
        .await
        .create_sessions(pb::CreateSessionsRequest {
            sessions: vec![item],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply.unsuccessful_list.is_empty(),
        "{:#?}",
        reply.unsuccessful_list
    );
    reply.successful_list[0].id.clone()
}

/// The `dcv create-session` calls for session `id`.
fn creations_of(home: &AgentHome, id: &str) -> usize {
    home.calls_of("create-session")
        .iter()
        .filter(|argv| argv.last().map(String::as_str) == Some(id))
        .count()
}

/// The value of `flag` in an argv, if given.
fn flag<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    argv.iter()
        .position(|a| a == flag)
        .and_then(|i| argv.get(i + 1))
        .map(String::as_str)
}

fn tag(server: &pb::Server, key: &str) -> Vec<String> {
    server
        .tags
        .iter()
        .filter(|t| t.key == key)
        .map(|t| t.value.clone())
        .collect()
}

#[tokio::test]
async fn the_host_appears_with_its_facts_and_the_tags_of_its_tags_folder() {
    let broker = start_broker().await;
    let home = AgentHome::new(
        &url(broker.addr),
        "max_virtual_sessions = 7\nmax_concurrent_sessions_per_user = 2\n\
         dcv_port = 8444\ndcv_web_url_path = '/dcv'",
    );
    // Read in alphabetical order, the later file wins on a shared key.
    home.tag_file("10-pool.toml", "pool = \"design\"\ncolour = \"red\"\n");
    home.tag_file("20-override.toml", "colour = \"blue\"\n");
    let (_agent, id) = AgentProcess::start_registered(&home).await;

    let server = server_where(broker.addr, &id, "AVAILABLE", |s| {
        s.availability == pb::Availability::Available as i32
    })
    .await;
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(server.hostname, hostname.trim());
    let host = server.host.as_ref().expect("host facts");
    let os = host.os.as_ref().expect("Os");
    assert_eq!(os.family, "linux");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert!(
        os.kernel_version.contains(release.trim()),
        "{os:?} vs uname -r {release}"
    );
    let cpus = host.cpu_info.as_ref().expect("CpuInfo").number_of_cpus;
    let listed = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let usable = std::thread::available_parallelism().unwrap().get();
    assert!(
        cpus as usize == listed || cpus as usize == usable,
        "NumberOfCpus {cpus}: /proc/cpuinfo lists {listed}, std sees {usable}"
    );
    assert!(host.memory.as_ref().expect("Memory").total_bytes > 0);
    assert_eq!(tag(&server, "pool"), ["design"]);
    assert_eq!(
        tag(&server, "colour"),
        ["blue"],
        "the later file wins: {:?}",
        server.tags
    );
    assert_eq!(server.max_virtual_sessions, 7);
    assert_eq!(server.max_concurrent_sessions_per_user, 2);
    assert!(
        server
            .endpoints
            .iter()
            .any(|e| e.port == 8444 && e.web_url_path == "/dcv"),
        "the DCV server's endpoint from dcv_port / dcv_web_url_path: {:?}",
        server.endpoints
    );
    assert_eq!(all_servers(broker.addr).await.len(), 1);
}

#[tokio::test]
async fn create_sessions_runs_dcv_create_session_with_the_request_and_the_session_becomes_ready() {
    let broker = start_broker().await;
    let home = AgentHome::new(&url(broker.addr), "");
    std::fs::write(home.init_folder().join("start.sh"), "#!/bin/sh\n").unwrap();
    let storage = home.path().join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let (_agent, _) = join(broker.addr, &home).await;

    let permissions = "[permissions]\n%owner% allow builtin\n";
    let id = create(
        broker.addr,
        pb::CreateSessionRequestData {
            init_file: "start.sh".into(),
            max_concurrent_clients: Some(3),
            dcv_gl_enabled: true,
            permissions_file: base64::engine::general_purpose::STANDARD.encode(permissions),
            storage_root: storage.display().to_string(),
            ..virtual_session("design review")
        },
    )
    .await;

    // READY: the agent has had the answer of `dcv create-session`.
    let session = ready(broker.addr, &id).await;
    assert_eq!(session.owner, owner());
    assert_eq!(session.name, "design review");
    let argv = home
        .call_where("create-session for the new session", |argv| {
            argv.first().map(String::as_str) == Some("create-session")
                && argv.last().map(String::as_str) == Some(id.as_str())
        })
        .await;
    assert_eq!(flag(&argv, "--type"), Some("virtual"), "{argv:?}");
    assert_eq!(flag(&argv, "--owner"), Some(owner().as_str()), "{argv:?}");
    assert_eq!(flag(&argv, "--name"), Some("design review"), "{argv:?}");
    if let Some(user) = flag(&argv, "--user") {
        assert_eq!(user, owner(), "{argv:?}");
    }
    assert_eq!(
        flag(&argv, "--init").map(std::path::PathBuf::from),
        Some(home.init_folder().join("start.sh")),
        "InitFile is relative to init_folder: {argv:?}"
    );
    assert_eq!(
        flag(&argv, "--max-concurrent-clients"),
        Some("3"),
        "{argv:?}"
    );
    assert_eq!(flag(&argv, "--gl"), Some("on"), "{argv:?}");
    assert_eq!(
        flag(&argv, "--storage-root"),
        Some(storage.to_str().unwrap()),
        "{argv:?}"
    );
    assert!(flag(&argv, "--permissions-file").is_some(), "{argv:?}");
    // The fake read the file while create-session ran (done: the session
    // is READY): the decoded content.
    let kept = std::fs::read_to_string(home.fake_state().join("permissions").join(&id)).unwrap();
    assert_eq!(kept, permissions);

    assert_eq!(creations_of(&home, &id), 1);
}

#[tokio::test]
async fn delete_sessions_runs_dcv_close_session_and_the_session_becomes_deleted() {
    let broker = start_broker().await;
    let home = AgentHome::new(&url(broker.addr), "");
    let (_agent, _) = join(broker.addr, &home).await;
    let id = create(broker.addr, virtual_session("short-lived")).await;
    ready(broker.addr, &id).await;
    assert!(home.fake_session(&id).is_some());

    let reply = sessions(broker.addr)
        .await
        .delete_sessions(pb::DeleteSessionsRequest {
            sessions: vec![pb::DeleteSessionRequestData {
                session_id: id.clone(),
                owner: owner(),
                force: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        reply.unsuccessful_list.is_empty(),
        "{:#?}",
        reply.unsuccessful_list
    );

    let argv = home
        .call_where("close-session", |argv| {
            argv.first().map(String::as_str) == Some("close-session")
        })
        .await;
    assert_eq!(argv, ["close-session", id.as_str()]);
    session_where(broker.addr, &id, "DELETED", |s| {
        s.state == pb::SessionState::Deleted as i32
    })
    .await;
    assert!(
        home.fake_session(&id).is_none(),
        "the fake's session is gone"
    );
}

#[tokio::test]
async fn a_killed_agent_comes_back_as_the_same_server_and_never_runs_an_instruction_twice() {
    let mut args = vec!["--in-memory", "--agent-timeout", "60s"];
    args.extend(BROKER_FLAGS);
    let broker = BrokerProcess::start_exactly(&args).await;
    let home = AgentHome::new(&url(broker.addr), "");
    let (agent, id) = join(broker.addr, &home).await;
    let done = create(broker.addr, virtual_session("before the crash")).await;
    ready(broker.addr, &done).await;

    // A second creation whose `dcv` did its work and never answered: the
    // agent dies with the instruction run but not reported.
    home.switch_on("hang-after-create-session", "");
    let pending = create(broker.addr, virtual_session("during the crash")).await;
    home.call_where("create-session for the pending session", |argv| {
        argv.first().map(String::as_str) == Some("create-session")
            && argv.last().map(String::as_str) == Some(pending.as_str())
    })
    .await;
    agent.kill().await;
    // The orphaned fake may go now; the agent is gone.
    home.switch_off("hang-after-create-session");

    let (mut agent, again) = AgentProcess::start_registered(&home).await;
    assert_eq!(again, id, "the server id is kept in state_dir");
    agent.logged("instruction stream open").await;
    let fleet = all_servers(broker.addr).await;
    assert_eq!(fleet.len(), 1, "one server, not a new one: {fleet:#?}");
    assert_eq!(fleet[0].id, id);

    ready(broker.addr, &done).await;
    ready(broker.addr, &pending).await;
    assert_eq!(creations_of(&home, &done), 1, "calls: {:#?}", home.calls());
    assert_eq!(
        creations_of(&home, &pending),
        1,
        "calls: {:#?}",
        home.calls()
    );
    let server = server_where(broker.addr, &id, "counts both sessions", |s| {
        s.virtual_session_count == 2
    })
    .await;
    assert_eq!(server.availability, pb::Availability::Available as i32);
}

#[tokio::test]
async fn after_a_broker_restart_the_agent_reconnects_and_the_fleet_is_whole() {
    let data = TempDir::new("dcv-broker-agent-e2e-store");
    let mut args = vec!["--data-dir", data.path().to_str().unwrap()];
    args.extend(BROKER_FLAGS);
    let mut broker = BrokerProcess::start_exactly(&args).await;
    // The agent keeps this URL: the broker comes back on the same port.
    let addr = broker.addr;
    let home = AgentHome::new(&url(addr), "");
    let (mut agent, id) = join(addr, &home).await;
    let before = create(addr, virtual_session("survives the broker")).await;
    ready(addr, &before).await;

    broker.signal("-KILL");
    broker.exited().await;
    agent.logged("broker unreachable").await;
    let _broker = BrokerProcess::start_on(addr, &args).await;
    let restarted = std::time::SystemTime::now();

    agent.logged("instruction stream open").await;
    server_where(
        addr,
        &id,
        "AVAILABLE with its session, heartbeating since the restart",
        |s| {
            s.availability == pb::Availability::Available as i32
                && s.virtual_session_count == 1
                && s.last_heartbeat_time.as_ref().is_some_and(|t| {
                    std::time::UNIX_EPOCH
                        + Duration::from_secs(t.seconds as u64)
                        + Duration::from_secs(1)
                        >= restarted
                })
        },
    )
    .await;
    ready(addr, &before).await;
    // Instructions flow again, with nobody having touched the agent.
    let after = create(addr, virtual_session("after the restart")).await;
    ready(addr, &after).await;
    assert_eq!(creations_of(&home, &before), 1);
    assert_eq!(all_servers(addr).await.len(), 1);
}

#[tokio::test]
async fn a_broker_that_forgot_everything_gets_the_server_and_its_sessions_back_from_the_agent() {
    let mut args = vec!["--in-memory"];
    args.extend(BROKER_FLAGS);
    let mut broker = BrokerProcess::start_exactly(&args).await;
    let addr = broker.addr;
    let home = AgentHome::new(&url(addr), "");
    let (mut agent, id) = join(addr, &home).await;
    let before = create(addr, virtual_session("outlives the broker's memory")).await;
    ready(addr, &before).await;

    broker.signal("-KILL");
    broker.exited().await;
    agent.logged("broker unreachable").await;
    let _broker = BrokerProcess::start_on(addr, &args).await;

    // The new broker knows nothing: the agent registers again, and its
    // reports bring the session back, with no operator action.
    assert_eq!(agent.registered().await, id);
    server_where(addr, &id, "AVAILABLE with its session", |s| {
        s.availability == pb::Availability::Available as i32 && s.virtual_session_count == 1
    })
    .await;
    let session = ready(addr, &before).await;
    assert_eq!(session.owner, owner());
    assert_eq!(creations_of(&home, &before), 1);
}

#[tokio::test]
async fn a_dcv_that_fails_fails_the_instruction_with_its_stderr_and_the_agent_stays_healthy() {
    let broker = start_broker().await;
    let home = AgentHome::new(&url(broker.addr), "");
    let (mut agent, id) = join(broker.addr, &home).await;

    home.switch_on(
        "fail-create-session",
        "Could not create session: no licenses available (fake dcv)\n",
    );
    let failed = create(
        broker.addr,
        pb::CreateSessionRequestData {
            disable_retry_on_failure: true,
            ..virtual_session("fails")
        },
    )
    .await;
    let session = session_where(broker.addr, &failed, "DELETED", |s| {
        s.state == pb::SessionState::Deleted as i32
    })
    .await;
    assert!(
        session
            .state_reason
            .contains("no licenses available (fake dcv)"),
        "dcv's stderr is the reason: {}",
        session.state_reason
    );
    agent.logged(&format!("session={failed} failed")).await;
    assert_eq!(creations_of(&home, &failed), 1, "not retried");
    home.switch_off("fail-create-session");

    // Healthy: heartbeats go on and the next creation works.
    let seen = available(broker.addr, &id)
        .await
        .last_heartbeat_time
        .expect("a heartbeat time");
    server_where(broker.addr, &id, "heartbeating", |s| {
        s.last_heartbeat_time
            .as_ref()
            .is_some_and(|t| (t.seconds, t.nanos) > (seen.seconds, seen.nanos))
    })
    .await;
    let fine = create(broker.addr, virtual_session("works")).await;
    ready(broker.addr, &fine).await;
    assert_eq!(creations_of(&home, &fine), 1);
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent still runs"
    );
}

#[tokio::test]
async fn a_dcv_that_hangs_is_killed_at_its_timeout_and_fails_the_instruction() {
    let broker = start_broker().await;
    // Short, but long enough for the other `dcv` calls (a Python script)
    // on a loaded test machine.
    let home = AgentHome::new(&url(broker.addr), "dcv_command_timeout = 3");
    let (mut agent, id) = join(broker.addr, &home).await;

    home.switch_on("hang-create-session", "");
    let hung = create(
        broker.addr,
        pb::CreateSessionRequestData {
            disable_retry_on_failure: true,
            ..virtual_session("hangs")
        },
    )
    .await;
    let session = session_where(broker.addr, &hung, "DELETED", |s| {
        s.state == pb::SessionState::Deleted as i32
    })
    .await;
    let reason = session.state_reason.to_lowercase();
    assert!(
        reason.contains("timed out") || reason.contains("timeout"),
        "{}",
        session.state_reason
    );
    agent.logged(&format!("session={hung} failed")).await;
    // Once, or not even logged if the machine is so loaded that Python
    // had not started when the timeout struck; never retried.
    assert!(creations_of(&home, &hung) <= 1, "{:#?}", home.calls());

    // The agent goes on: it runs, and heartbeats.
    let seen = server_where(broker.addr, &id, "heartbeating", |s| {
        s.last_heartbeat_time.is_some()
    })
    .await
    .last_heartbeat_time
    .unwrap();
    server_where(broker.addr, &id, "heartbeating again", |s| {
        s.last_heartbeat_time
            .as_ref()
            .is_some_and(|t| (t.seconds, t.nanos) > (seen.seconds, seen.nanos))
    })
    .await;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent still runs"
    );
    // The hung `dcv` was killed at its timeout, not left to finish the
    // creation behind the broker's back once its switch goes away.
    assert_eq!(fake_dcv_processes_with(&hung), Vec::<u32>::new());
    home.switch_off("hang-create-session");
}

/// The processes running the fake dcv with `arg` among their arguments.
fn fake_dcv_processes_with(arg: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.iter().any(|a| a.ends_with(b"fake-dcv")) && args.contains(&arg.as_bytes()) {
            found.push(pid);
        }
    }
    found
}

/// Runs the agent on `config` (written into a fresh directory); asserts it
/// exits 2 with one line on stderr that starts `dcv-broker-agent: ` and
/// contains `key`.
async fn refused_config(config: &str, key: &str) {
    let dir = TempDir::new("dcv-broker-agent-config");
    let path = dir.path().join("agent.conf");
    std::fs::write(&path, config.replace("DIR", dir.path().to_str().unwrap())).unwrap();
    let out = run_agent(&[], Some(&path), dir.path()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "exit 2 for a bad config; stderr {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one clear line: {stderr}");
    assert!(lines[0].starts_with("dcv-broker-agent: "), "{}", lines[0]);
    assert!(lines[0].contains(key), "the line names {key}: {}", lines[0]);
}

#[tokio::test]
async fn an_unknown_key_stops_the_agent_with_one_line_naming_it() {
    refused_config(
        "[agent]\nbroker_url = 'http://127.0.0.1:1'\nstate_dir = 'DIR/state'\nbrokr_host = 'x'\n",
        "brokr_host",
    )
    .await;
}

#[tokio::test]
async fn a_missing_broker_host_stops_the_agent_with_one_line_naming_it() {
    refused_config("[agent]\nstate_dir = 'DIR/state'\n", "broker_host").await;
}

#[tokio::test]
async fn an_unreadable_ca_file_stops_the_agent_with_one_line_naming_it() {
    refused_config(
        "[agent]\nbroker_host = '127.0.0.1'\nbroker_port = 1\nca_file = 'DIR/missing-ca.pem'\n\
         state_dir = 'DIR/state'\n",
        "ca_file",
    )
    .await;
}

#[tokio::test]
async fn a_secret_file_readable_by_others_stops_the_agent_with_one_line_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("dcv-broker-agent-secret");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    refused_config(
        &format!(
            "[agent]\nbroker_url = 'http://127.0.0.1:1'\nstate_dir = 'DIR/state'\n\
             client_id = 'agent-7'\nclient_secret_file = '{}'\n",
            secret.display()
        ),
        "client_secret_file",
    )
    .await;
}

/// The delay of a `... retrying in <DURATION>` line.
fn retry_delay(line: &str) -> Duration {
    let rest = &line[line.find("retrying in ").expect("retrying in") + "retrying in ".len()..];
    let token: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == ' ')
        .collect();
    // humantime's form (`1s 200ms`), or a float of seconds / milliseconds.
    let token = token.trim();
    if let Ok(d) = humantime::parse_duration(token) {
        return d;
    }
    let first = token.split_whitespace().next().unwrap_or_default();
    if let Some(ms) = first.strip_suffix("ms") {
        return Duration::from_secs_f64(ms.parse::<f64>().unwrap() / 1000.0);
    }
    let secs = first.strip_suffix('s').unwrap_or(first);
    Duration::from_secs_f64(
        secs.parse()
            .unwrap_or_else(|_| panic!("a delay in {line:?}")),
    )
}

#[tokio::test]
async fn an_unreachable_broker_is_retried_with_growing_delays_and_logged_each_time() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let home = AgentHome::new(&url(closed), "reconnect_max_delay = 3");
    let mut agent = AgentProcess::start(&home);
    let mut delays = Vec::new();
    for _ in 0..3 {
        let line = agent.logged("broker unreachable").await;
        assert!(line.contains("retrying in"), "{line}");
        delays.push(retry_delay(&line));
    }
    assert!(
        delays.iter().all(|d| *d <= Duration::from_millis(3500)),
        "capped at 3 s: {delays:?}"
    );
    assert!(
        delays[1..].iter().any(|d| *d > delays[0]),
        "the delay grows: {delays:?}"
    );
    agent.terminate().await;
}

#[tokio::test]
async fn check_reaches_the_broker_once_and_says_ok_or_why_not() {
    let broker = start_broker().await;
    let home = AgentHome::new(&url(broker.addr), "");
    let out = home.run(&["check"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "ok");

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    home.write_config(&url(closed), "");
    let out = home.run(&["check"]).await;
    assert!(
        !out.status.success(),
        "an unreachable broker fails the check"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
}

#[tokio::test]
async fn server_id_prints_the_id_the_broker_shows() {
    let broker = start_broker().await;
    let home = AgentHome::new(&url(broker.addr), "");
    // Before the agent ever ran: the id is made and kept.
    let out = home.run(&["server-id"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!printed.is_empty());
    let (_agent, id) = AgentProcess::start_registered(&home).await;
    assert_eq!(id, printed);
    let shown = all_servers(broker.addr).await;
    assert_eq!(
        shown.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        [printed.as_str()]
    );
    let again = home.run(&["server-id"]).await;
    assert_eq!(String::from_utf8(again.stdout).unwrap().trim(), printed);
}

#[tokio::test]
async fn num_of_connections_follows_what_dcv_reports() {
    let broker = start_broker().await;
    let home = AgentHome::new(&url(broker.addr), "");
    let (_agent, _) = join(broker.addr, &home).await;
    let id = create(broker.addr, virtual_session("watched")).await;
    ready(broker.addr, &id).await;

    home.edit_session(&id, |s| s["num-of-connections"] = 2.into());
    session_where(broker.addr, &id, "has 2 connections", |s| {
        s.num_of_connections == 2
    })
    .await;
    home.edit_session(&id, |s| {
        s["num-of-connections"] = 0.into();
        s["last-disconnection-time"] = "2026-01-02T03:04:05.000006Z".into();
    });
    let session = session_where(broker.addr, &id, "has no connection", |s| {
        s.num_of_connections == 0
    })
    .await;
    let at = session
        .last_disconnection_time
        .expect("LastDisconnectionTime from the agent's report");
    assert_eq!(at.seconds, 1_767_323_045, "2026-01-02T03:04:05Z");
}

#[tokio::test]
async fn get_session_screenshots_returns_a_decodable_png_from_dcv() {
    let broker = start_broker().await;
    let home = AgentHome::new(&url(broker.addr), "");
    let (_agent, _) = join(broker.addr, &home).await;
    let id = create(broker.addr, virtual_session("pictured")).await;
    ready(broker.addr, &id).await;

    let reply = sessions(broker.addr)
        .await
        .get_session_screenshots(pb::GetSessionScreenshotsRequest {
            sessions: vec![
                pb::GetSessionScreenshotRequestData {
                    session_id: id.clone(),
                    max_width: Some(200),
                    max_height: Some(100),
                },
                pb::GetSessionScreenshotRequestData {
                    session_id: "no-such-session".into(),
                    max_width: None,
                    max_height: None,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.successful_list.len(), 1, "{reply:#?}");
    assert_eq!(reply.unsuccessful_list.len(), 1, "{reply:#?}");
    let shot = reply.successful_list[0]
        .session_screenshot
        .as_ref()
        .unwrap();
    assert_eq!(shot.session_id, id);
    let image = &shot.images[0];
    assert_eq!(image.format, "png");
    let decoder = png::Decoder::new(std::io::Cursor::new(image.data.clone()));
    let reader = decoder.read_info().expect("a decodable PNG");
    let info = reader.info();
    assert!(info.width > 0 && info.width <= 200 && info.height > 0 && info.height <= 100);
    let argv = home
        .call_where("get-screenshot", |argv| {
            argv.first().map(String::as_str) == Some("get-screenshot")
        })
        .await;
    assert_eq!(argv.last().map(String::as_str), Some(id.as_str()));
    assert_eq!(flag(&argv, "--max-width"), Some("200"), "{argv:?}");
    assert_eq!(flag(&argv, "--max-height"), Some("100"), "{argv:?}");
}

/// POSTs DCV's token verification form to the broker; the reply body.
async fn verify(addr: SocketAddr, session_id: &str, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("sessionId", session_id)
        .append_pair("authenticationToken", token)
        .append_pair("clientAddress", "198.51.100.7")
        .finish();
    let request = format!(
        "POST /agent/validate-authentication-token HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut reply))
        .await
        .expect("the verifier answers")
        .unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "DCV expects 200 with a verdict: {head}"
    );
    body.to_string()
}

#[tokio::test]
async fn the_connection_token_is_accepted_by_the_http_verifier_for_its_session_only() {
    let mut args = vec!["--in-memory", "--connection-token-ttl", "3s"];
    args.extend(BROKER_FLAGS);
    let broker = BrokerProcess::start_exactly(&args).await;
    let home = AgentHome::new(&url(broker.addr), "");
    let (_agent, _) = join(broker.addr, &home).await;
    let id = create(broker.addr, virtual_session("connect to me")).await;
    let other = create(broker.addr, virtual_session("not this one")).await;
    ready(broker.addr, &id).await;
    ready(broker.addr, &other).await;

    let token = sessions(broker.addr)
        .await
        .get_session_connection_data(pb::GetSessionConnectionDataRequest {
            session_id: id.clone(),
            user: owner(),
        })
        .await
        .unwrap()
        .into_inner()
        .connection_token;
    let issued = std::time::Instant::now();

    let yes = verify(broker.addr, &id, &token).await;
    assert!(yes.contains("<auth result=\"yes\">"), "{yes}");
    assert!(
        yes.contains(&format!("<username>{}</username>", owner())),
        "{yes}"
    );

    let elsewhere = verify(broker.addr, &other, &token).await;
    assert!(
        elsewhere.contains("result=\"no\""),
        "another session: {elsewhere}"
    );
    let mut garbled = token.clone().into_bytes();
    let mid = garbled.len() / 2;
    garbled[mid] = if garbled[mid] == b'A' { b'B' } else { b'A' };
    let garbled = String::from_utf8(garbled).unwrap();
    let no = verify(broker.addr, &id, &garbled).await;
    assert!(no.contains("result=\"no\""), "garbled: {no}");
    let junk = verify(broker.addr, &id, "%%%not-a-token\u{1F600}").await;
    assert!(junk.contains("result=\"no\""), "junk: {junk}");

    // After its TTL the same token is refused (bounded polling).
    let expired = tokio::time::timeout(PATIENCE, async {
        loop {
            let reply = verify(broker.addr, &id, &token).await;
            if reply.contains("result=\"no\"") {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the token expires");
    assert!(
        issued.elapsed() >= Duration::from_secs(2),
        "not before its TTL: {expired}"
    );
}
