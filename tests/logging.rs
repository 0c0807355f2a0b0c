//! The binary's `--log` flag and RUST_LOG: a bare level is the broker's
//! own (libraries stay at info), while a directive or RUST_LOG gives full
//! control.

mod common;

use common::process::{BROKER_BIN, BrokerProcess};
use dcv_broker::pb::{self, servers_client::ServersClient};

/// Everything the broker logs while it serves one DescribeServers and
/// shuts down, started with `args` and, if given, RUST_LOG.
async fn log_of_one_request(args: &[&str], rust_log: Option<&str>) -> Vec<String> {
    let mut command = tokio::process::Command::new(BROKER_BIN);
    command
        .args(["--listen", "127.0.0.1:0", "--in-memory"])
        .args(args)
        .env_remove("DCV_BROKER_LOG")
        .env_remove("RUST_LOG");
    if let Some(filter) = rust_log {
        command.env("RUST_LOG", filter);
    }
    let mut broker = BrokerProcess::spawn(command).await;
    ServersClient::connect(format!("http://{}", broker.addr))
        .await
        .unwrap()
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .unwrap();
    broker.signal("-TERM");
    // The last line of a shutdown, at info: everything before it is in.
    let lines = broker.lines_until("stopped").await;
    assert_eq!(broker.exited().await.code(), Some(0));
    lines
}

fn any(lines: &[String], level: &str, target: &str) -> bool {
    lines
        .iter()
        .any(|l| l.contains(&format!(" {level} ")) && l.contains(target))
}

#[tokio::test]
async fn log_debug_is_the_brokers_debug_output_without_the_libraries() {
    let lines = log_of_one_request(&["--log", "debug"], None).await;
    assert!(any(&lines, "DEBUG", "servers described"), "{lines:#?}");
    let libraries: Vec<&String> = lines
        .iter()
        .filter(|l| (l.contains(" DEBUG ") || l.contains(" TRACE ")) && !l.contains("dcv_broker"))
        .collect();
    assert!(libraries.is_empty(), "{libraries:#?}");

    // A directive is taken as is: here HTTP/2's frames, at trace.
    let lines = log_of_one_request(&["--log", "debug,h2=trace"], None).await;
    assert!(any(&lines, "TRACE", "h2::"), "{lines:#?}");
    assert!(any(&lines, "DEBUG", "servers described"));
}

#[tokio::test]
async fn rust_log_gives_full_control_unless_the_flag_is_given() {
    let lines = log_of_one_request(&[], Some("debug")).await;
    assert!(any(&lines, "DEBUG", "h2::"), "{lines:#?}");
    assert!(any(&lines, "DEBUG", "servers described"));

    let lines = log_of_one_request(&["--log", "info"], Some("debug")).await;
    assert!(!lines.iter().any(|l| l.contains(" DEBUG ")), "{lines:#?}");
}
