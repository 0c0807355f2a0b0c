//! The agents' port (`--agent-listen`): agents register, heartbeat and
//! keep their instruction stream there while operators see them on the main
//! port; the agents' port serves nothing else of the API; its threads run
//! at the lower priority asked; a SIGTERM drains both ports; and the flags
//! are checked.

mod common;

use std::{net::SocketAddr, process::Command};

use common::{
    TestAgent, beat, describe_one, process::BrokerProcess, process::PATIENCE, registration,
};
use dcv_broker::pb::{self, servers_client::ServersClient};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_dcv-broker");

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The status of one plain HTTP/1.1 request (JSON body when not empty).
async fn http1_status(addr: SocketAddr, method: &str, path: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut reply))
        .await
        .expect("a reply")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    reply
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {reply:?}"))
}

/// The nice value of each thread of `pid` whose name is `name`.
fn nice_of_threads(pid: u32, name: &str) -> Vec<i64> {
    let mut nice = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue; // the thread ended meanwhile
        };
        if comm.trim() != name {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses: the
        // nice value is field 19, the 17th after the name.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        nice.push(after.split(' ').nth(16).unwrap().parse().unwrap());
    }
    nice
}

#[tokio::test]
async fn agents_on_their_own_port_are_seen_on_the_main_one() {
    let broker =
        BrokerProcess::start(&["--agent-listen", "127.0.0.1:0", "--agent-nice", "7"]).await;
    let agents = broker.agent_addr.expect("an agents' port");
    assert_ne!(agents, broker.addr);

    let mut agent = TestAgent::connect_to(agents, registration("ap-1", "linux", 4)).await;
    agent
        .beat(vec![common::session(
            "s-1",
            pb::SessionType::Virtual,
            pb::SessionState::Ready,
        )])
        .await;
    let mut servers = ServersClient::new(channel(broker.addr).await);
    let server = describe_one(&mut servers, "ap-1").await;
    assert_eq!(server.virtual_session_count, 1, "{server:?}");

    // The agents' port serves agents, not operators.
    let mut wrong = ServersClient::new(channel(agents).await);
    let refused = wrong
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .expect_err("DescribeServers is not served on the agents' port");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    // Health is, for the agents' load balancer.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(agents).await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // Nor DCV's REST API; but /health, for the agents' load balancer.
    assert_eq!(
        http1_status(agents, "POST", "/closeServers", "[]").await,
        404
    );
    assert_eq!(
        http1_status(agents, "GET", "/dcv-session-manager-api.yaml", "").await,
        404
    );
    assert_eq!(http1_status(agents, "GET", "/health", "").await, 200);
    assert_eq!(
        http1_status(
            broker.addr,
            "POST",
            "/closeServers",
            r#"[{"ServerId":"nope"}]"#
        )
        .await,
        200
    );
    // The main port still takes agents.
    let mut other = TestAgent::connect_to(broker.addr, registration("ap-2", "linux", 4)).await;
    other.client.heartbeat(beat("ap-2", vec![])).await.unwrap();
    describe_one(&mut servers, "ap-2").await;

    // Its threads run at the priority asked; the broker's others do not.
    let pid = broker.pid();
    let lowered = nice_of_threads(pid, "agent-port");
    assert!(!lowered.is_empty(), "no agent-port thread");
    assert!(lowered.iter().all(|&n| n == 7), "{lowered:?}");
    let workers = nice_of_threads(pid, "tokio-rt-worker");
    assert!(!workers.is_empty(), "no main worker thread");
    assert!(workers.iter().all(|&n| n == 0), "{workers:?}");

    // A SIGTERM ends the instruction stream on the agents' port and the
    // broker exits 0 (`terminate` checks), well within the drain deadline.
    broker.signal("-TERM");
    let ended = tokio::time::timeout(PATIENCE, agent.stream.message())
        .await
        .expect("the instruction stream ends on shutdown");
    match ended {
        Ok(None) => {}
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(Some(message)) => panic!("an instruction on shutdown: {message:?}"),
    }
    broker.terminate().await;
}

#[tokio::test]
async fn a_token_from_the_agents_port_is_good_on_it() {
    let dir = std::env::temp_dir().join(format!("agent-port-auth-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.to_str().unwrap();
    let registered = Command::new(BIN)
        .args(["clients", "register", "--json", "--data-dir", data_dir])
        .args([
            "--name",
            "ap-agent",
            "--scopes",
            "agent",
            "--server-id",
            "ap-auth",
        ])
        .output()
        .unwrap();
    assert!(registered.status.success(), "{registered:?}");
    let printed: serde_json::Value = serde_json::from_slice(&registered.stdout).unwrap();
    let field = |key: &str| printed["client"][key].as_str().unwrap().to_owned();
    let (id, secret) = (field("client_id"), field("client_secret"));
    let broker = BrokerProcess::start_exactly(&[
        "--agent-listen",
        "127.0.0.1:0",
        "--auth",
        "on",
        "--data-dir",
        data_dir,
    ])
    .await;
    let agents = broker.agent_addr.unwrap();
    let request = dcv_broker::oauth::TokenRequest {
        url: format!("http://{agents}{}", dcv_broker::oauth::TOKEN_PATH_AND_QUERY),
        client_id: id,
        secret,
        ca_pem: None,
        accept_any_certificate: false,
        user_agent: "agent-port-test".into(),
    };
    let token = tokio::task::spawn_blocking(move || dcv_broker::oauth::request_token(&request))
        .await
        .unwrap()
        .expect("the agents' port serves the token endpoint")
        .access_token;
    let mut client = pb::agent_client::AgentClient::with_interceptor(
        channel(agents).await,
        move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            Ok(request)
        },
    );
    client
        .register_server(registration("ap-auth", "linux", 2))
        .await
        .expect("an agent token is good on the agents' port");
    broker.terminate().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn agent_port_flags_are_checked() {
    let refused = |args: &[&str], says: &str| {
        let out = Command::new(BIN)
            .args(["--in-memory", "--listen", "127.0.0.1:8443"])
            .args(args)
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}: it never listened");
    };
    refused(&["--agent-listen", "127.0.0.1:8443"], "a port of their own");
    refused(
        &["--agent-listen", "0.0.0.0:8445"],
        "--agent-listen: refusing to serve plaintext",
    );
    refused(
        &["--agent-listen", "127.0.0.1:0", "--agent-nice", "20"],
        "--agent-nice",
    );
    refused(
        &["--agent-listen", "127.0.0.1:0", "--agent-threads", "0"],
        "--agent-threads",
    );
}
