//! The `dcv-broker` binary itself: its listening line, its refusal to
//! serve plaintext beyond loopback, and a clean exit on SIGTERM.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

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

#[test]
fn announces_its_port_and_exits_zero_on_sigterm() {
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--demo-fleet",
            "10",
            "--in-memory",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("dcv-broker listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);
    std::net::TcpStream::connect(addr).expect("the broker accepts connections");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
}

#[tokio::test]
async fn logs_each_request_in_a_span_carrying_its_request_id() {
    use dcv_broker::pb;
    use tokio::io::{AsyncBufReadExt, BufReader as AsyncBufReader};

    let mut child = tokio::process::Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--demo-fleet",
            "3",
            "--in-memory",
        ])
        .args(["--log", "debug", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = AsyncBufReader::new(child.stdout.take().unwrap()).lines();
    let line = stdout.next_line().await.unwrap().unwrap();
    let addr = line
        .trim_start_matches("dcv-broker listening on ")
        .to_string();
    let mut client = pb::servers_client::ServersClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let reply = client
        .close_servers(pb::CloseServersRequest {
            servers: vec![pb::CloseServerRequestData {
                server_id: "serverId1".into(),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();

    // Read the log until the request's completion event shows up.
    let mut stderr = AsyncBufReader::new(child.stderr.take().unwrap()).lines();
    let event = loop {
        let line = stderr.next_line().await.unwrap().expect("log ended early");
        if line.contains("servers closed") {
            break line;
        }
    };
    assert!(
        event.contains(&format!("\"request_id\":\"{}\"", reply.request_id)),
        "{event}"
    );
    assert!(
        event.contains("/dcv.sessionmanager.v1.Servers/CloseServers"),
        "{event}"
    );
    assert!(event.contains("\"peer\":\"127.0.0.1:"), "{event}");
    child.kill().await.unwrap();
}
