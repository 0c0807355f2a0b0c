//! Connections against the real binary: idle sockets beyond the cap are
//! closed at once and logged, connections that never start a request or
//! stay idle are reaped so that real clients get in again, an open stream
//! keeps its connection, and the open-file limit is raised and logged.

mod common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{
    process::{BrokerProcess, PATIENCE},
    raw_h2::RawH2,
};
use dcv_broker::pb::{self, servers_client::ServersClient};
use tokio::{io::AsyncReadExt, net::TcpStream};
use tonic::transport::Channel;

/// Opens `n` TCP connections that send nothing.
async fn idle_sockets(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(TcpStream::connect(addr).await.unwrap());
    }
    sockets
}

/// Waits, at most `bound`, for the broker to close `socket`; returns how
/// long that took.
async fn closed_within(socket: &mut TcpStream, bound: Duration) -> Duration {
    let started = Instant::now();
    let mut byte = [0u8; 1];
    match tokio::time::timeout(bound, socket.read(&mut byte)).await {
        Ok(Ok(0) | Err(_)) => started.elapsed(),
        Ok(Ok(_)) => panic!("the broker sent bytes to a client that sent none"),
        Err(_) => panic!("still open after {bound:?}"),
    }
}

/// One real call on a fresh connection.
async fn real_call(addr: SocketAddr) -> Result<usize, String> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    ServersClient::new(channel)
        .describe_servers(pb::DescribeServersRequest::default())
        .await
        .map(|r| r.into_inner().servers.len())
        .map_err(|e| format!("call: {e:?}"))
}

/// Calls until a real client gets served, a bounded number of times.
async fn until_served(addr: SocketAddr) -> usize {
    let mut pause = Duration::from_millis(10);
    let mut last = String::new();
    let deadline = Instant::now() + PATIENCE;
    while Instant::now() < deadline {
        match real_call(addr).await {
            Ok(n) => return n,
            Err(e) => last = e,
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    panic!("a real client never got served: {last}");
}

#[tokio::test]
async fn connections_over_the_cap_are_closed_at_once_and_logged() {
    // Reaping far away, so that only the cap is at work.
    let mut broker =
        BrokerProcess::start(&["--max-connections", "50", "--first-request-timeout", "60s"]).await;
    let held = idle_sockets(broker.addr, 50).await;
    let mut extra = idle_sockets(broker.addr, 5).await;
    for socket in &mut extra {
        closed_within(socket, Duration::from_secs(10)).await;
    }
    let line = broker.logged("connection limit reached").await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("max_connections=50"), "{line}");
    // Every slot is taken: a real client is refused too.
    assert!(real_call(broker.addr).await.is_err());

    // Slots come back as the idle ones go.
    drop(held);
    assert_eq!(until_served(broker.addr).await, 3);
    broker.terminate().await;
}

#[tokio::test]
async fn sockets_that_never_start_a_request_are_reaped_and_real_clients_get_in() {
    let mut broker =
        BrokerProcess::start(&["--max-connections", "50", "--first-request-timeout", "1s"]).await;
    let opened = Instant::now();
    let mut idle = idle_sockets(broker.addr, 60).await;
    // A real client gets in once the idle ones are reaped.
    assert_eq!(until_served(broker.addr).await, 3);

    // Those that got a slot held it until their bound; the broker closed
    // every one (the first-request timeout, or the cap).
    for socket in &mut idle[..50] {
        closed_within(socket, PATIENCE).await;
    }
    assert!(
        opened.elapsed() >= Duration::from_secs(1),
        "closed before their first-request timeout"
    );
    let line = broker.logged("closed an idle connection").await;
    assert!(line.contains("no_preface=true"), "{line}");
    broker.terminate().await;
}

#[tokio::test]
async fn an_idle_connection_is_reaped_but_one_with_an_open_stream_is_kept() {
    let mut broker = BrokerProcess::start(&["--idle-connection-timeout", "1s"]).await;
    // A watch stream, on a connection of its own, open throughout.
    let mut watching = RawH2::connect(broker.addr).await;
    let _watch = watching.open_stream("/grpc.health.v1.Health/Watch").await;

    // A connection that makes one call, then nothing.
    let mut idle = RawH2::connect(broker.addr).await;
    // Taken before the call: the broker counts from the reply's end, later.
    let last_call = Instant::now();
    assert_eq!(
        idle.call("/grpc.health.v1.Health/Check").await.as_deref(),
        Some("0")
    );
    tokio::time::timeout(PATIENCE, &mut idle.connection)
        .await
        .expect("the broker closes the idle connection")
        .unwrap()
        .ok();
    let idle_for = last_call.elapsed();
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(5)).contains(&idle_for),
        "closed after {idle_for:?}, for an idle timeout of 1 s"
    );
    broker.logged("no request for the idle timeout").await;

    // The watching connection was idle-timed-out too, were streams not
    // counted: it still serves a call.
    assert!(!watching.connection.is_finished());
    assert_eq!(
        watching
            .call("/grpc.health.v1.Health/Check")
            .await
            .as_deref(),
        Some("0")
    );
    broker.terminate().await;
}

/// The broker binary started by `sh` after `ulimit` with `limit` (`-Sn
/// 1024`: the soft open-file limit; `-n 1024`: both).
async fn start_under(limit: &str, args: &[&str]) -> BrokerProcess {
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(format!("ulimit {limit} && exec \"$0\" \"$@\""))
        .arg(common::process::BROKER_BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--in-memory",
            "--demo-fleet",
            "3",
        ])
        .args(["--shutdown-grace", "0s"])
        .args(args);
    BrokerProcess::spawn(command).await
}

#[tokio::test]
async fn the_soft_open_file_limit_is_raised_to_the_hard_one_and_logged() {
    let mut broker = start_under("-Sn 1024", &[]).await;
    let line = broker.logged("file descriptor limit").await;
    assert_eq!(field(&line, "soft_before="), 1024, "{line}");
    let (soft, hard) = (field(&line, "soft="), field(&line, "hard="));
    assert_eq!(soft, hard, "raised to the hard limit: {line}");
    assert_eq!(
        field(&line, "max_connections="),
        10_000.min(soft - 64),
        "{line}"
    );
    broker.terminate().await;
}

#[tokio::test]
async fn more_idle_sockets_than_file_descriptors_do_not_lock_real_clients_out() {
    // The attack as reported: 1,100 idle connections, held open, against
    // the default 1,024 descriptors. The cap is lowered to fit with room to
    // spare, and idle sockets are reaped, so a real client gets in while
    // the attacker still holds every socket it opened.
    let mut broker = start_under("-n 1024", &["--first-request-timeout", "2s"]).await;
    let line = broker.logged("file descriptor limit").await;
    assert_eq!(field(&line, "max_connections="), 1024 - 64, "{line}");
    broker.logged("--max-connections lowered").await;

    let _idle = idle_sockets(broker.addr, 1100).await;
    assert_eq!(until_served(broker.addr).await, 3);
    broker.terminate().await;
}

/// The number after `name` in a log line.
fn field(line: &str, name: &str) -> u64 {
    let rest = &line[line
        .find(name)
        .unwrap_or_else(|| panic!("{name} in {line}"))
        + name.len()..];
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("a number after {name} in {line}"))
}
