//! The `dcv-broker` binary itself: its listening line, its refusal to
//! serve plaintext beyond loopback, a clean exit on SIGTERM, and a demo
//! fleet that is gone with its process.

mod common;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dcv-broker");

#[test]
fn refuses_a_non_loopback_listener_without_the_insecure_flag() {
    let out = Command::new(BIN)
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve plaintext gRPC without authentication on non-loopback address 0.0.0.0:0"),
        "{stderr}"
    );
    assert!(stderr.contains("--allow-insecure-non-loopback"), "{stderr}");
    assert!(out.stdout.is_empty(), "it never listened");
}

#[test]
fn rejects_inconsistent_timeouts() {
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--unreachable-after", "2h"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--remove-after"));
}

#[tokio::test]
async fn announces_its_port_and_exits_zero_on_sigterm() {
    let args = ["--demo-fleet", "10", "--in-memory"];
    let broker = common::process::BrokerProcess::start_exactly(&args).await;
    let addr = broker.addr;
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
    std::net::TcpStream::connect(addr).expect("the broker accepts connections");
    broker.terminate().await;
}

#[tokio::test]
async fn logs_each_request_in_a_span_carrying_its_request_id() {
    use dcv_broker::pb;

    let args = [
        "--demo-fleet",
        "3",
        "--in-memory",
        "--log",
        "debug",
        "--log-format",
        "json",
    ];
    let mut broker = common::process::BrokerProcess::start_exactly(&args).await;
    let addr = broker.addr;
    let mut client = pb::servers_client::ServersClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let reply = client
        .close_servers(pb::CloseServersRequest {
            servers: vec![pb::CloseServerRequestData {
                server_id: "serverId1".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    // Read the log until the request's completion event shows up.
    let event = broker.logged("servers closed").await;
    assert!(
        event.contains(&format!("\"request_id\":\"{}\"", reply.request_id)),
        "{event}"
    );
    assert!(
        event.contains("/dcv.sessionmanager.v1.Servers/CloseServers"),
        "{event}"
    );
    assert!(event.contains("\"peer\":\"127.0.0.1:"), "{event}");
}

/// Every server id the broker at `broker` describes, page after page.
async fn described_ids(broker: &common::process::BrokerProcess) -> Vec<String> {
    use dcv_broker::pb;
    let mut client = pb::servers_client::ServersClient::connect(format!("http://{}", broker.addr))
        .await
        .unwrap();
    let mut ids = Vec::new();
    let mut next_token = String::new();
    loop {
        let reply = client
            .describe_servers(pb::DescribeServersRequest {
                next_token: next_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(reply.servers.into_iter().map(|s| s.id));
        if reply.next_token.is_empty() {
            return ids;
        }
        next_token = reply.next_token;
    }
}

/// Simulated servers live as long as the process that simulates them: a
/// run without the demo fleet on the same data directory shows none of
/// them (not even as UNREACHABLE for an hour), and a smaller demo fleet
/// describes only its own servers. The store still keeps what is real in a
/// demo: its clients and bearer-token key.
#[tokio::test]
async fn a_demo_fleet_does_not_outlive_its_process() {
    use common::process::BrokerProcess;
    use dcv_broker::pb;
    let dir = std::env::temp_dir().join(format!("dcv-broker-demo-{}", uuid::Uuid::new_v4()));
    let start = |demo: &'static str| {
        let dir = dir.clone();
        async move {
            let mut args = vec!["--data-dir".into(), dir.into_os_string()];
            if demo != "0" {
                args.extend(["--demo-fleet".into(), demo.into()]);
            }
            BrokerProcess::start_exactly(&args).await
        }
    };

    let mut big = start("40").await;
    let _ = big.logged("demo fleet registered").await;
    assert_eq!(described_ids(&big).await.len(), 40);
    let mut client = pb::servers_client::ServersClient::connect(format!("http://{}", big.addr))
        .await
        .unwrap();
    let closed = client
        .close_servers(pb::CloseServersRequest {
            servers: vec![pb::CloseServerRequestData {
                server_id: "serverId1".into(),
                reason: "demo".into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(closed.successful_list.len(), 1);
    big.terminate().await;

    let plain = start("0").await;
    assert_eq!(
        described_ids(&plain).await,
        Vec::<String>::new(),
        "a run without the demo fleet shows none of its servers"
    );
    plain.terminate().await;

    let mut small = start("3").await;
    let _ = small.logged("demo fleet registered").await;
    let ids = described_ids(&small).await;
    assert_eq!(ids.len(), 3, "only this run's simulated servers: {ids:?}");
    let first = client_describe_one(&small, "serverId1").await;
    assert!(
        first.holds.is_empty(),
        "the last demo's close is gone: {first:?}"
    );
    small.terminate().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn client_describe_one(
    broker: &common::process::BrokerProcess,
    id: &str,
) -> dcv_broker::pb::Server {
    let mut client =
        dcv_broker::pb::servers_client::ServersClient::connect(format!("http://{}", broker.addr))
            .await
            .unwrap();
    common::describe_one(&mut client, id).await
}
