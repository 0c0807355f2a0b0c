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

/// A broker allowing one request a second, logging in `format` at the
/// default level, after it refused a gRPC DescribeServers and a REST
/// /describeServers for their rate: its log lines up to the second
/// refusal's warning, and the REST refusal's reply.
async fn log_of_two_refusals(format: &str) -> (Vec<String>, String) {
    let mut command = tokio::process::Command::new(BROKER_BIN);
    command
        .args(["--listen", "127.0.0.1:0", "--in-memory"])
        .args([
            "--log-format",
            format,
            "--client-rate",
            "1",
            "--client-burst",
            "1",
        ])
        .env_remove("DCV_BROKER_LOG")
        .env_remove("RUST_LOG");
    let mut broker = BrokerProcess::spawn(command).await;
    let mut client = ServersClient::connect(format!("http://{}", broker.addr))
        .await
        .unwrap();
    client
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .unwrap();
    let refused = client
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    let reply = http1_post(broker.addr, "/describeServers", "{}").await;
    assert!(reply.starts_with("HTTP/1.1 429"), "{reply}");
    let mut lines = broker.lines_until("client over its request rate").await;
    lines.extend(broker.lines_until("client over its request rate").await);
    broker.signal("-TERM");
    assert_eq!(broker.exited().await.code(), Some(0));
    (lines, reply)
}

/// The reply, head and body, to one HTTP/1.1 POST of `body` to `path`.
async fn http1_post(addr: std::net::SocketAddr, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap();
    reply
}

/// The `request_id` of a REST refusal's reply.
fn rest_request_id(reply: &str) -> String {
    let body = reply.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let body: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {reply}"));
    body["request_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{reply}"))
        .to_owned()
}

const DESCRIBE_SERVERS: &str = "/dcv.sessionmanager.v1.Servers/DescribeServers";

#[tokio::test]
async fn a_warning_inside_a_request_names_its_id_and_method_at_info_in_text() {
    let (lines, reply) = log_of_two_refusals("text").await;
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" WARN ") && l.contains("client over its request rate"))
        .collect();
    assert_eq!(warnings.len(), 2, "{lines:#?}");
    let id_of = |line: &str| -> uuid::Uuid {
        let (_, rest) = line
            .split_once(" request_id=")
            .unwrap_or_else(|| panic!("{line}"));
        rest[..36].parse().unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    assert!(
        warnings[0].ends_with(&format!("method={DESCRIBE_SERVERS}")),
        "{}",
        warnings[0]
    );
    assert!(
        warnings[1].ends_with(" method=/describeServers"),
        "{}",
        warnings[1]
    );
    // The REST refusal's reply names the id its warning was logged with.
    assert_eq!(id_of(warnings[1]).to_string(), rest_request_id(&reply));
    assert_ne!(id_of(warnings[0]), id_of(warnings[1]));
    // Events outside a request name none.
    let started = lines.iter().find(|l| l.contains("--in-memory")).unwrap();
    assert!(!started.contains("request_id="), "{started}");
}

#[tokio::test]
async fn a_warning_inside_a_request_names_its_id_and_method_at_info_in_json() {
    let (lines, reply) = log_of_two_refusals("json").await;
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let warnings: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| {
            e["level"] == "WARN" && e["fields"]["message"] == "client over its request rate"
        })
        .collect();
    assert_eq!(warnings.len(), 2, "{lines:#?}");
    assert_eq!(warnings[0]["method"], DESCRIBE_SERVERS);
    assert_eq!(warnings[1]["method"], "/describeServers");
    assert_eq!(
        warnings[1]["request_id"].as_str(),
        Some(rest_request_id(&reply).as_str())
    );
    assert_ne!(warnings[0]["request_id"], warnings[1]["request_id"]);
    assert!(
        warnings[0]["request_id"]
            .as_str()
            .unwrap()
            .parse::<uuid::Uuid>()
            .is_ok()
    );
    let started = events
        .iter()
        .find(|e| {
            e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("--in-memory"))
        })
        .unwrap();
    assert!(started.get("request_id").is_none(), "{started}");
}
